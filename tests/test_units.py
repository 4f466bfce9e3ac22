import pytest

from loopsearch.errors import BudgetError
from loopsearch.units import GPU_PEAK_BF16, format_flops, parse_flops


@pytest.mark.parametrize("text,flops", [
    ("3e13", 3e13), (3e13, 3e13), ("30 TFLOP", 30e12), ("2 PFLOP", 2e15), ("2 pflops", 2e15),
    ("1.5GFLOP", 1.5e9), ("500", 500.0),
])
def test_budget_forms(text, flops):
    assert parse_flops(text) == pytest.approx(flops)


def test_gpu_time_budget():
    assert parse_flops("h100:2h@0.4") == pytest.approx(GPU_PEAK_BF16["h100"] * 7200 * 0.4)
    assert parse_flops("a100:30m@0.5") == pytest.approx(312e12 * 1800 * 0.5)


@pytest.mark.parametrize("bad", ["lots", "-5", "0", "3 XFLOP", "tpu9:1h", "h100:1h@1.5"])
def test_bad_budgets_name_the_forms(bad):
    with pytest.raises(BudgetError) as e:
        parse_flops(bad)
    assert bad.split(":")[0] in str(e.value) or "MFU" in str(e.value) or "positive" in str(e.value)


def test_format_flops():
    assert format_flops(3.2e13) == "32 TFLOP"
    assert format_flops(5e11) == "500 GFLOP"
