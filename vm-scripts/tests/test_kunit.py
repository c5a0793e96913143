# SPDX-License-Identifier: GPL-2.0
"""The driver's KUnit suites (CONFIG_VIRTIO_MEM_RUST_KUNIT_TEST), built into the debug kernel
(build/bzImage-debug), run at boot and print KTAP on the console; this parses it.

KTAP as lib/kunit/test.c prints it (tools/testing/kunit/kunit_parser.py reads the same),
each line after the printk timestamp:

    KTAP version 1
    1..2                                    suites
        KTAP version 1
        # Subtest: virtio_mem_rust_config   a suite opens
        # module: virtio_mem_rust           attributes
        1..3                                its cases
        ok 1 accepts_valid_config           a case
            KTAP version 1
            # Subtest: rejects_bad_field    a parameterised case opens
            ok 1 param-1                    its parameters
            not ok 2 param-2
        not ok 2 rejects_bad_field
        ok 3 skipped_case # SKIP reason
    # virtio_mem_rust_config: pass:1 fail:1 skip:1 total:3
    not ok 1 virtio_mem_rust_config         the suite's result closes it

Other kernel messages may come in between. A result line closes the subtests opened at a
deeper indentation; a suite that never prints its result (the kernel died in it) has none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

PREFIX = "virtio_mem_rust"

TIMESTAMP = re.compile(r"^\[[^\]]*\] ?")
HEADER = re.compile(r"^(\s*)# Subtest: (\S.*?)\s*$")
PLAN = re.compile(r"^(\s*)1\.\.(\d+)\s*$")
RESULT = re.compile(r"^(\s*)(ok|not ok) (\d+)(?: -)? ?([^#]*?)\s*(?:# (.*?))?\s*$")
STATS = re.compile(r"^\s*# (\S+): pass:(\d+) fail:(\d+) skip:(\d+) total:(\d+)\s*$")


@dataclass
class Suite:
    name: str
    indent: int
    plan: int | None = None
    # Its cases: (ok or not ok, name, directive such as "SKIP reason").
    cases: list[tuple[str, str, str]] = field(default_factory=list)
    # Every "not ok" line inside it, parameters of a case included.
    not_ok: list[str] = field(default_factory=list)
    # ok or not ok, and its directive; None while it has not finished.
    result: str | None = None
    directive: str = ""
    # The "# name: pass:N fail:N skip:N total:N" line, when KUnit printed one.
    stats: dict[str, int] | None = None

    def count(self, what: str) -> int:
        """Cases that passed ("pass"), failed ("fail") or were skipped ("skip")."""
        def kind(c):
            return "skip" if c[2].upper().startswith("SKIP") else "pass" if c[0] == "ok" else "fail"
        return sum(1 for c in self.cases if kind(c) == what)


def ktap_suites(console: str) -> list[Suite]:
    """The top-level KUnit suites in a console log, in order."""
    suites: list[Suite] = []
    # Open subtests: (indentation of their header, name, the Suite if top-level).
    stack: list[tuple[int, str, Suite | None]] = []
    for raw in console.splitlines():
        line = TIMESTAMP.sub("", raw.rstrip("\r"))
        if m := HEADER.match(line):
            indent = len(m.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            suite = None
            if not stack:
                suite = Suite(m.group(2), indent)
                suites.append(suite)
            stack.append((indent, m.group(2), suite))
        elif m := RESULT.match(line):
            indent, res, name, directive = len(m.group(1)), m.group(2), m.group(4), m.group(5) or ""
            for _, _, s in stack:
                if s and res == "not ok" and indent >= s.indent:
                    s.not_ok.append(line.strip())
            closed = None
            while stack and stack[-1][0] > indent:
                closed = stack.pop()
            if closed and closed[2] and closed[1] == name:
                closed[2].result, closed[2].directive = res, directive
            elif stack and stack[-1][2] and stack[-1][0] == indent:
                stack[-1][2].cases.append((res, name, directive))
        elif m := PLAN.match(line):
            if stack and stack[-1][2] and stack[-1][0] == len(m.group(1)):
                stack[-1][2].plan = int(m.group(2))
        elif m := STATS.match(line):
            for s in reversed(suites):
                if s.name == m.group(1):
                    s.stats = dict(zip(("pass", "fail", "skip", "total"), map(int, m.group(2, 3, 4, 5))))
                    break
    return suites


def check_suites(suites: list[Suite], prefix: str = PREFIX) -> list[str]:
    """What is wrong with the suites named prefix*: nothing ([]) when there is at least one,
    with at least one case, and each finished with ok (not skipped), with no "not ok"
    inside and as many cases as announced."""
    ours = [s for s in suites if s.name.startswith(prefix)]
    errors = []
    if not ours:
        errors.append(f"no KUnit suite named {prefix}* in the KTAP output "
                      f"(suites: {[s.name for s in suites] or 'none'})")
    elif not sum(len(s.cases) for s in ours):
        errors.append(f"the {prefix}* suites have no test case")
    for s in ours:
        if s.result is None:
            errors.append(f"{s.name}: no result line (did the kernel die in it?)")
        elif s.result != "ok":
            errors.append(f"{s.name}: {s.result}")
        elif s.directive.upper().startswith("SKIP"):
            errors.append(f"{s.name}: skipped as a whole ({s.directive})")
        errors += [f"{s.name}: {line}" for line in s.not_ok]
        if s.plan is not None and s.plan != len(s.cases):
            errors.append(f"{s.name}: announced {s.plan} cases, reported {len(s.cases)}")
        if s.stats and (s.stats["fail"] or s.stats["total"] != len(s.cases)):
            errors.append(f"{s.name}: KUnit's count {s.stats}, {len(s.cases)} cases reported")
    return errors


# -- the parser on KTAP written by hand: it must find each kind of failure -----------------

GOOD = """\
[    1.000000] KTAP version 1
[    1.000001] 1..3
[    1.000002]     KTAP version 1
[    1.000003]     # Subtest: other_suite
[    1.000004]     1..1
[    1.000005]     not ok 1 other_case
[    1.000006] not ok 1 other_suite
[    1.000010]     KTAP version 1
[    1.000011]     # Subtest: virtio_mem_rust_config
[    1.000012]     # module: virtio_mem_rust
[    1.000013]     1..3
[    1.000014]     ok 1 accepts_valid_config
[    1.000015] virtio_mem_rust: invalid device config: block_size = 0x0
[    1.000016]         KTAP version 1
[    1.000017]         # Subtest: rejects_bad_field
[    1.000018]         ok 1 param-1
[    1.000019]         ok 2 param-2
[    1.000020]     # rejects_bad_field: pass:2 fail:0 skip:0 total:2
[    1.000021]     ok 2 rejects_bad_field
[    1.000022]     ok 3 needs_numa # SKIP no NUMA
[    1.000023] # virtio_mem_rust_config: pass:2 fail:0 skip:1 total:3
[    1.000024] ok 2 virtio_mem_rust_config
[    1.000030]     KTAP version 1
[    1.000031]     # Subtest: virtio_mem_rust_device
[    1.000032]     1..1
[    1.000033]     ok 1 plugs_on_ack
[    1.000034] ok 3 virtio_mem_rust_device
"""


def test_ktap_parser_passing_suites():
    suites = ktap_suites(GOOD)
    assert [s.name for s in suites] == ["other_suite", "virtio_mem_rust_config", "virtio_mem_rust_device"]
    cfg = suites[1]
    assert cfg.result == "ok" and cfg.plan == 3
    assert [c[1] for c in cfg.cases] == ["accepts_valid_config", "rejects_bad_field", "needs_numa"]
    assert (cfg.count("pass"), cfg.count("fail"), cfg.count("skip")) == (2, 0, 1)
    assert cfg.stats == {"pass": 2, "fail": 0, "skip": 1, "total": 3}
    assert check_suites(suites) == []
    # The serial console's CRLF, and no timestamps (CONFIG_PRINTK_TIME off).
    assert check_suites(ktap_suites(GOOD.replace("\n", "\r\n"))) == []
    assert check_suites(ktap_suites(re.sub(r"(?m)^\[[^\]]*\] ", "", GOOD))) == []
    assert check_suites(suites, "other_suite") == ["other_suite: not ok", "other_suite: not ok 1 other_case"]


@pytest.mark.parametrize("broken, error", [
    pytest.param(GOOD.replace("ok 2 param-2", "not ok 2 param-2"),
                 "virtio_mem_rust_config: not ok 2 param-2", id="param-not-ok"),
    pytest.param(GOOD.replace("    ok 1 plugs_on_ack", "    not ok 1 plugs_on_ack")
                     .replace("ok 3 virtio_mem_rust_device", "not ok 3 virtio_mem_rust_device"),
                 "virtio_mem_rust_device: not ok", id="suite-not-ok"),
    pytest.param(GOOD.replace("[    1.000034] ok 3 virtio_mem_rust_device\n", ""),
                 "virtio_mem_rust_device: no result line", id="unfinished"),
    pytest.param(GOOD.replace("ok 3 virtio_mem_rust_device", "ok 3 virtio_mem_rust_device # SKIP no device"),
                 "virtio_mem_rust_device: skipped as a whole", id="suite-skipped"),
    pytest.param(GOOD.replace("    ok 1 accepts_valid_config\n", ""),
                 "virtio_mem_rust_config: announced 3 cases, reported 2", id="case-missing"),
    pytest.param(GOOD.replace("pass:2 fail:0 skip:1", "pass:1 fail:1 skip:1"),
                 "virtio_mem_rust_config: KUnit's count", id="stats-fail"),
    pytest.param(GOOD.replace("virtio_mem_rust", "other"),
                 "no KUnit suite named virtio_mem_rust*", id="no-suite"),
    pytest.param("\n".join(l for l in GOOD.splitlines()
                           if not re.search(r"\]  +(ok |1\.\.)|# virtio_mem_rust_config:", l)),
                 "the virtio_mem_rust* suites have no test case", id="no-case"),
])
def test_ktap_parser_finds_failures(broken, error):
    errors = check_suites(ktap_suites(broken))
    assert any(e.startswith(error) for e in errors), errors


# -- on the debug kernel ----------------------------------------------------------------

def test_kunit_suites_at_boot(boot):
    """Every virtio_mem_rust* KUnit suite built into the debug kernel ran at boot and passed.
    KTAP comes from the kernel's log buffer, checked end to end (Vm.kernel_log): the
    console itself may mangle a character, which in a suite's name would lose its result."""
    vm = boot("debug")
    log = vm.kernel_log()
    assert "KTAP version 1" in log, "no KTAP output in the kernel log: KUnit did not run at boot"
    suites = ktap_suites(log)
    plan = re.search(r"^(?:\[[^\]]*\] ?)?1\.\.(\d+)\s*$", log, re.M)
    assert plan and int(plan.group(1)) == len(suites), \
        f"KUnit announced {plan and plan.group(1)} suites, the log has {len(suites)}"
    ours = [s for s in suites if s.name.startswith(PREFIX)]
    print(f"KUnit suites at boot: {len(suites)}, named {PREFIX}*: {len(ours)}, "
          f"their cases: {sum(len(s.cases) for s in ours)}")
    for s in ours:
        print(f"  {s.name}: {s.result or 'unfinished'}{' # ' + s.directive if s.directive else ''}, "
              f"{len(s.cases)} cases: {s.count('pass')} passed, {s.count('fail')} failed, "
              f"{s.count('skip')} skipped")
    errors = check_suites(suites)
    assert not errors, "\n".join(errors)
