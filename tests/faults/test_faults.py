"""Each case of the fault matrix (tests/faults/cases.py) is one test: refused cleanly or handled, by the
case's rule (see that module). ``python scripts/fault_matrix.py`` prints them as a matrix."""
import pytest

from tests.faults.cases import CASES, SLOW, Context, Run, Skip, judge

pytestmark = pytest.mark.faults


@pytest.fixture(scope="session")
def ctx(tmp_path_factory):
    """The inputs the cases share (tiny HF dirs, a converted checkpoint, one 4-step torch_glm run), built
    once, on first use."""
    return Context(str(tmp_path_factory.mktemp("fault_inputs")))


def _param(case):
    return pytest.param(case, id=case.__name__[5:], marks=[pytest.mark.slow] if case.__name__ in SLOW else [])


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_refused_cleanly_or_handled(case, ctx, tmp_path, record_property):
    result = case(ctx, str(tmp_path))
    try:
        ok, why = judge(result, str(tmp_path))
    except Skip as e:
        pytest.skip(str(e))
    label = "refused" if isinstance(result, Run) or getattr(result, "label", "") == "refused" else "handled"
    record_property("verdict", label)
    record_property("why", why)
    assert ok, why
