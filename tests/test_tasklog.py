"""`e4srec run`'s quiet task output: KFP's executor dumps go, a stage's error stays as one line, a bug's
traceback stays whole."""

from __future__ import annotations

from e4srec.tasklog import TaskOutput

DUMP = """[KFP Executor 2026-11-30 19:33:46,847 INFO]: Looking for component `prepare_data` in --component_module_path `/tmp/x.py`
[KFP Executor 2026-11-30 19:33:46,848 INFO]: Got executor_input:
{
    "inputs": {
        "parameterValues": {"seed": 42}
    }
}
prepare-data: 100%|##########| 22363/22363 [00:02<00:00, 9000.00user/s]
[KFP Executor 2026-11-30 19:33:54,000 INFO]: Wrote executor output file to /tmp/out.json.

"""

STAGE_FAILURE = """Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/x/stages/pretrain_sasrec.py", line 100, in run
    raise E4SRecError(...)
e4srec.errors.E4SRecError: PretrainSasrecConfig.dropout=2.0: must be in [0, 1)
"""

BUG = """Traceback (most recent call last):
  File "/x/stages/pretrain_sasrec.py", line 100, in run
    x = y[3]
IndexError: list index out of range
"""


def test_executor_dumps_go_and_the_stage_lines_stay() -> None:
    out = TaskOutput()
    kept = list(out.filter(DUMP.splitlines(keepends=True)))
    assert kept == ["prepare-data: 100%|##########| 22363/22363 [00:02<00:00, 9000.00user/s]\n"]
    assert out.last_error is None


def test_a_stage_error_is_its_one_line_and_a_bug_keeps_its_traceback() -> None:
    out = TaskOutput()
    kept = list(out.filter((STAGE_FAILURE + "after\n").splitlines(keepends=True)))
    assert kept == ["error: PretrainSasrecConfig.dropout=2.0: must be in [0, 1)\n", "after\n"]
    assert out.last_error == "PretrainSasrecConfig.dropout=2.0: must be in [0, 1)"
    bug = TaskOutput()
    assert list(bug.filter(BUG.splitlines(keepends=True))) == BUG.splitlines(keepends=True)
    assert bug.last_error is None
