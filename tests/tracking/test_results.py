"""tune-results.json read back: anything that is not the file `liverseg tune` writes is one line."""

import json

import pytest

from liverseg.core.errors import InputError
from liverseg.tracking.results import SearchResults, TrialResult, read_results, write_results
from support.cli import run_liverseg


def _results() -> SearchResults:
    trial = TrialResult("t1", "completed", 3, 0.8, {"train.lr": 0.01}, "r1", "runs:/r1/model")
    return SearchResults("parent", "val_dice", "max", "liverseg", [trial])


def _good() -> dict:
    return _results().to_json()


@pytest.mark.parametrize(
    "content, says",
    [
        ("[1, 2]", "not a liverseg search results file (format 'a JSON list')"),
        ("[" * 100_000, "not a readable search results file (RecursionError)"),
        ("\x80 not utf-8", "not a readable search results file"),
        ({"trials": [1]}, "a trial is a int, not an object"),
        ({"trials": []}, "trials is not a non-empty list"),
        ({"trials": {"a": 1}}, "trials is not a non-empty list"),
        ({"best": None, "trials": [{"trial_id": "t", "status": "won", "epochs": 1}]}, "status 'won' not in"),
        ({"trials": [{"trial_id": "t", "status": "completed", "epochs": 1, "model_uri": 5}]}, "model_uri '5' has"),
        ({"trials": [{"trial_id": "t", "status": "completed", "epochs": "3"}]}, "epochs '3' has the wrong type"),
        ({"parent_run_id": ["x"]}, "parent_run_id, metric, mode and experiment must be text"),
        ({"format_version": [2]}, "format_version '[2]', this liverseg reads 1"),
        (" " * (5 << 20), "larger than 4194304 bytes"),
    ],
)
def test_a_bad_results_file_is_one_line(tmp_path, content, says):
    path = tmp_path / "tune-results.json"
    if isinstance(content, dict):
        path.write_text(json.dumps({**_good(), **content}))
    else:
        path.write_bytes(b"\x80 not" if "\x80" in content else content.encode())
    with pytest.raises(InputError, match=f"{path}: .*") as e:
        read_results(path)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_the_written_file_reads_back_and_register_names_a_bad_one(tmp_path, mlflow_uri):
    path = tmp_path / "tune-results.json"
    write_results(path, _results())
    assert read_results(path).best.model_uri == "runs:/r1/model"
    path.write_text("[1]")
    res = run_liverseg(["register", "--best-of-tune", str(path)])
    assert res.returncode == 1 and "not a liverseg search results file" in res.stderr.splitlines()[-1]
    assert "Traceback" not in res.stderr
