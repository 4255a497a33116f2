"""``lorafit tune`` when things go wrong: Ctrl-C in the middle of a trial stops the whole search (the journal
keeps the finished trials, the same command continues with the interrupted trial's settings), and a failed
trial is one line, after which the search goes on."""

from __future__ import annotations

import json
import os
import signal

import pytest

from lorafit.errors import LorafitError
from lorafit.training import tune as tune_module

from conftest import train_args
from test_errors import error_line, run_cli

pytest.importorskip("optuna", reason="lorafit[tune] is not installed")


def tune_argv(model_dir, data, out) -> list[str]:
    args = [a for a in train_args(model_dir, data, out, "--epochs", "1") if a != "train"]
    return ["tune", *args, "--space", "lr,rank", "--eval-every", "0", "--no-prune", "--trials", "2"]


def trial_states(out) -> dict[int, str]:
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "study.journal")))
    study = optuna.load_study(study_name=tune_module.STUDY, storage=storage)
    return {t.number: (t.state.name, t.params) for t in study.get_trials(deepcopy=False)}


def during_trial(monkeypatch, number: int, act) -> None:
    """Call ``act(record)`` on each metrics record of trial ``number`` (the others train untouched)."""
    real = tune_module.train_run

    def train_run(spec, data_cfg, train_cfg, directory, *args, on_record=None, **kwargs):
        if directory.name == f"trial-{number:03d}":
            inner = on_record
            on_record = lambda rec: (act(rec), inner(rec))  # noqa: E731
        return real(spec, data_cfg, train_cfg, directory, *args, on_record=on_record, **kwargs)

    monkeypatch.setattr(tune_module, "train_run", train_run)


def test_ctrl_c_in_a_trial_stops_the_search_and_the_same_command_continues(tmp_path, hf_gpt2_dir, sms_file, capsys,
                                                                          monkeypatch):
    out = tmp_path / "tune"
    argv = tune_argv(hf_gpt2_dir, sms_file, out)
    sent = []

    def ctrl_c(record):  # a real SIGINT to this process, in trial 1's third step
        if record["event"] == "train" and record["step"] == 3 and not sent:
            sent.append(record["step"])
            signal.raise_signal(signal.SIGINT)

    during_trial(monkeypatch, 1, ctrl_c)
    code, err = run_cli(capsys, *argv)
    assert code == 130 and sent == [3]
    line = error_line(err)
    assert "search interrupted; 1 finished trial kept in" in line and "run the same command again" in line, err
    states = trial_states(out)
    assert states[0][0] == "COMPLETE" and states[1][0] == "FAIL"
    assert not (out / "trial-002").exists()  # the search stopped: no trial after the interrupted one
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are restored
    monkeypatch.undo()
    code, err = run_cli(capsys, *argv)  # the same command: the interrupted trial's settings run again
    assert code == 0, err
    states = trial_states(out)
    assert [s for s, _ in states.values()] == ["COMPLETE", "FAIL", "COMPLETE"] and states[2][1] == states[1][1]
    summary = json.loads((out / "tune.json").read_text())
    assert [t["state"] for t in summary["trials"]] == ["complete", "fail", "complete"]


def test_a_failed_trial_is_one_line_and_the_search_goes_on(tmp_path, hf_gpt2_dir, sms_file, capsys, monkeypatch):
    out = tmp_path / "tune"

    def fail(record):
        raise LorafitError("the loss went nan at step 1")

    during_trial(monkeypatch, 1, fail)
    code, err = run_cli(capsys, *tune_argv(hf_gpt2_dir, sms_file, out))
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "trial 1" in ln]
    assert lines == [f"lorafit: warning: trial 1 failed: the loss went nan at step 1 (its run folder: "
                     f"{out / 'trial-001'})"], err
    assert "Traceback" not in err and "failed with parameters" not in err
    summary = json.loads((out / "tune.json").read_text())
    assert [t["state"] for t in summary["trials"]] == ["complete", "fail", "complete"]


def test_ctrl_c_stops_every_trial_of_a_parallel_search(tmp_path, hf_gpt2_dir, sms_file, capsys, monkeypatch):
    """--jobs 2: a Ctrl-C sent to the process (as a terminal sends it) from within trial 1's thread reaches the
    main thread's handler; both trials, running in threads, stop at their next step."""
    out = tmp_path / "tune"
    argv = [*tune_argv(hf_gpt2_dir, sms_file, out), "--jobs", "2"]
    sent = []

    def ctrl_c(record):
        if record["event"] == "train" and record["step"] == 3 and not sent:
            sent.append(record["step"])
            os.kill(os.getpid(), signal.SIGINT)

    during_trial(monkeypatch, 1, ctrl_c)
    code, err = run_cli(capsys, *argv)
    assert code == 130 and sent == [3] and "search interrupted" in error_line(err), err
    states = [s for s, _ in trial_states(out).values()]
    # trial 1 stopped, and trial 0 with it unless it had finished; every stopped trial is queued again
    assert states[1] == "FAIL" and states[0] in ("FAIL", "COMPLETE") and states.count("WAITING") == states.count("FAIL")
    assert not (out / "trial-002").exists()
    monkeypatch.undo()
    code, err = run_cli(capsys, *argv)
    assert code == 0, err
    summary = json.loads((out / "tune.json").read_text())
    assert sum(t["state"] == "complete" for t in summary["trials"]) == 2
