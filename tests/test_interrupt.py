import os
import signal

import pytest

from loopsearch import interrupt


def test_first_ctrl_c_waits_for_a_safe_point_and_the_second_does_not():
    reached = []
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with pytest.raises(KeyboardInterrupt):
        with interrupt.deferred():
            os.kill(os.getpid(), signal.SIGINT)  # e.g. while a storage call runs
            reached.append("after the signal")  # ... the call finishes
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)  # impatient: a second Ctrl-C interrupts at once
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("still running")
            interrupt.check()  # the next training step stops here
            reached.append("never")
    assert reached == ["after the signal", "still running"]
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_a_ctrl_c_after_the_last_check_still_ends_the_block_as_interrupted():
    with pytest.raises(KeyboardInterrupt):
        with interrupt.deferred():
            os.kill(os.getpid(), signal.SIGINT)
    interrupt.check()  # nothing pending afterwards


def test_sigterm_is_handled_like_ctrl_c():
    """`timeout`, systemd, SLURM and Kubernetes send SIGTERM: the run stops at the next safe point."""
    before = signal.getsignal(signal.SIGTERM)
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interrupt.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            reached.append("after the signal")
            interrupt.check()
            reached.append("never")
    assert reached == ["after the signal"] and signal.getsignal(signal.SIGTERM) is before


def test_infinite_and_absurd_budgets_are_one_line_errors():
    from loopsearch.errors import BudgetError
    from loopsearch.units import parse_flops

    for bad in ("1e999", float("inf"), "inf", 1e40):
        with pytest.raises(BudgetError, match="budget"):
            parse_flops(bad)
