"""`make demo-cap` without root: one line naming the fix, before any stack is looked for or
any packet filter touched (the demonstration itself: tests/e2e/test_demo_cap.py)."""

from __future__ import annotations

import os

import pytest
from ordermesh_deploy import demo_cap, stacks


def test_without_root_it_says_so_in_one_line_before_touching_anything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)

    def no_stack(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("looked for a stack before checking for root")

    monkeypatch.setattr(stacks, "find_or_exit", no_stack)
    with pytest.raises(SystemExit) as exited:
        demo_cap.main(["--target", "local"])
    assert exited.value.code == demo_cap.NOT_ROOT
    assert "\n" not in demo_cap.NOT_ROOT
    assert "sudo -E make demo-cap" in demo_cap.NOT_ROOT


def test_durations_below_two_seconds_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        demo_cap.parse_args(["--cut", "1"])
    assert "--cut" in capsys.readouterr().err
