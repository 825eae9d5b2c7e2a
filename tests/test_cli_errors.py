"""Issue 21.1: every user error of the command lines is one line on stderr naming the file, line,
field and what was expected, and exit status 2; never a traceback unless --debug.

klong.py runs in process (`klong.main(argv)` returns the exit status, as `python klong.py`
would); the other CLIs (judge.py, split.py, sandbox.py, factory.py) run as the user runs them.
Each case would catch a CLI that lets the exception through (a traceback, exit 1), one that
prints the usage block (several lines), or one whose message does not say where the input is bad.
"""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
import klong
import split
from tests.strategies import make_trajectory

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden-size", "32", "--intermediate-size", "64", "--layers", "1", "--heads", "2",
        "--kv-heads", "1", "--context-len", "256", "--max-new-tokens", "8", "--warmup", "1"]


def one_error_line(err: str, prog: str) -> str:
    """The single error line of stderr (progress bars aside); fails on a traceback or a usage."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.replace("\r", "\n").splitlines()
             if ln.strip() and "%|" not in ln]                 # tqdm bars: "desc:  50%|███ |"
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


def klong_error(capsys, *argv) -> str:
    code = klong.main(list(map(str, argv)))
    assert code == 2
    return one_error_line(capsys.readouterr().err, "klong.py")


def sft(tmp_path, data, *more):
    return ("--stage", "sft", "--run-dir", tmp_path / "run", "--data", data, "--sft-steps", "1",
            *TINY, *more)


def good_data(tmp_path, name="good.jsonl", n=2, prefix_obs=5) -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(make_trajectory(i, 3, prefix_obs, 0.0, 0, tid=f"t{i}")) + "\n"
                            for i in range(n)))
    return path


# ----------------------------------------------------------------------------- data files

def test_missing_data_file(tmp_path, capsys):
    line = klong_error(capsys, *sft(tmp_path, tmp_path / "nope.jsonl"))
    assert "nope.jsonl" in line and "--data" in line and "no such file" in line


def test_empty_data_file(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    line = klong_error(capsys, *sft(tmp_path, tmp_path / "empty.jsonl"))
    assert "empty.jsonl" in line and "no records" in line


def test_binary_data_file(tmp_path, capsys):
    (tmp_path / "model.jsonl").write_bytes(bytes(range(256)) * 40)
    line = klong_error(capsys, *sft(tmp_path, tmp_path / "model.jsonl"))
    assert "model.jsonl:1" in line and "not UTF-8" in line


def test_non_json_data_file(tmp_path, capsys):
    path = good_data(tmp_path)
    path.write_text(path.read_text() + "id,task,messages\n")
    line = klong_error(capsys, *sft(tmp_path, path))
    assert f"{path}:3" in line and "not valid JSON" in line


def test_field_less_records_report_every_bad_field_with_line_numbers(tmp_path, capsys):
    path = good_data(tmp_path)
    bad = {"id": 7, "messages": [{"role": "robot", "content": 3}], "prefix_len": 5, "score": "x"}
    path.write_text(path.read_text() + "{}\n" + json.dumps(bad) + "\n")
    line = klong_error(capsys, *sft(tmp_path, path))
    assert f"{path}:3: field 'messages'" in line        # {}: a chat example without messages
    with pytest.raises(split.RecordError) as e:          # as a trajectory file: every field named
        split.load_jsonl(path)
    for field in ("id", "task_id", "prefix_len", "messages"):
        assert f"{path}:3: " in str(e.value) and f"'{field}' is missing" in str(e.value)
    # line 4: each of its five bad fields
    four = line[line.index(f"{path}:4"):]
    for field in ("'id': expected str", "'task_id' is missing", "'messages[0].role'",
                  "'messages[0].content'", "'prefix_len': expected 0..1", "'score'"):
        assert field in four, (field, four)


def test_chat_data_that_is_not_an_object(tmp_path, capsys):
    (tmp_path / "chat.jsonl").write_text('[1, 2]\n"text"\n')
    line = klong_error(capsys, *sft(tmp_path, tmp_path / "chat.jsonl"))
    assert "chat.jsonl:1" in line and "chat.jsonl:2" in line and "expected a JSON object" in line


def test_data_of_an_unknown_kind(tmp_path, capsys):
    (tmp_path / "data.txt").write_text("hello\n")
    line = klong_error(capsys, *sft(tmp_path, tmp_path / "data.txt"))
    assert "data.txt" in line and ".jsonl" in line


# ----------------------------------------------------------------------------- models and splitting

def test_missing_init(tmp_path, capsys):
    line = klong_error(capsys, *sft(tmp_path, good_data(tmp_path), "--init", tmp_path / "nomodel"))
    assert "--init" in line and "nomodel" in line and "no such folder" in line


@pytest.mark.parametrize("content", ["empty", "junk", "file"])
def test_init_that_is_not_a_model(tmp_path, capsys, content):
    init = tmp_path / "notamodel"
    if content == "file":
        init.write_text("weights?")
    else:
        init.mkdir()
        if content == "junk":
            (init / "config.json").write_text('{"model_type": "no-such-architecture"}')
    line = klong_error(capsys, *sft(tmp_path, good_data(tmp_path), "--init", init))
    assert "--init" in line and "notamodel" in line and ("not a model" in line or "cannot load" in line)


def test_context_too_small_for_the_pinned_prefix(tmp_path, capsys):
    data = good_data(tmp_path, prefix_obs=300)          # p: ~300 words of paper reading
    line = klong_error(capsys, *sft(tmp_path, data), "--context-len", "64", "--overlap", "8")
    assert "L_max" in line and "p" in line


# ----------------------------------------------------------------------------- flags and folders

def test_unknown_preset(capsys):
    line = klong_error(capsys, "--stage", "sft", "--preset", "huge")
    assert "--preset" in line and "huge" in line and "tiny" in line


@pytest.mark.parametrize("flag,value,kind", [("--lr", "fast", "float"), ("--sft-steps", "2.5", "int"),
                                             ("--rl-timeouts", "24,x", "int"),
                                             ("--pack", "maybe", "true/false")])
def test_non_numeric_flag_value(capsys, flag, value, kind):
    line = klong_error(capsys, "--stage", "sft", flag, value)
    assert flag in line and value in line and kind in line


@pytest.mark.parametrize("flag,value", [("--context-len", "0"), ("--history", "1.5"),
                                        ("--lr", "nan"), ("--overlap", "9999"),
                                        ("--sandbox-pool", "-2")])
def test_out_of_range_flag_value(capsys, flag, value):
    line = klong_error(capsys, "--stage", "sft", flag, value)
    assert flag in line and "expected" in line


def test_unknown_stage_and_unknown_flag(capsys):
    assert "--stage" in klong_error(capsys, "--stage", "pretrain")
    assert "--contxt-len" in klong_error(capsys, "--stage", "sft", "--contxt-len", "5")


def test_unwritable_run_directory(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")                # a folder under a file: never writable
    line = klong_error(capsys, "--stage", "sft", "--run-dir", tmp_path / "afile" / "run")
    assert "--run-dir" in line and "afile" in line


def test_read_only_run_directory(tmp_path, capsys):
    line = klong_error(capsys, "--stage", "sft", "--run-dir", "/proc/klong-run")
    assert "--run-dir" in line and "/proc/klong-run" in line


def test_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    """Two steps, a checkpoint each; the disk fills during the second save (ENOSPC from
    torch.save, as simulated): one line, exit 2, checkpoint-1 complete, no half checkpoint-2."""
    saves, real_save = [], torch.save

    def save(obj, f, *a, **k):
        if isinstance(f, (str, Path)):                 # files, not DCP's in-memory buffers
            saves.append(f)
        if len(saves) == 2 and isinstance(f, (str, Path)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save)
    line = klong_error(capsys, *sft(tmp_path, good_data(tmp_path)), "--sft-steps", "2",
                       "--save-every", "1", "--checkpoint-pretrained", "false")
    assert "checkpoint-2" in line and "no space left" in line.lower()
    out = tmp_path / "run" / "sft"
    assert (out / "checkpoint-1" / "COMPLETE").exists()
    assert not (out / "checkpoint-2").exists() and not list(out.glob(".tmp-*"))


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(cli.UserError, match="nope.jsonl"):
        klong.main([*map(str, sft(tmp_path, tmp_path / "nope.jsonl")), "--debug"])
    (tmp_path / "bad.jsonl").write_text("{\n")
    with pytest.raises(split.RecordError, match="bad.jsonl:1"):
        klong.main([*map(str, sft(tmp_path, tmp_path / "bad.jsonl")), "--debug"])


# ----------------------------------------------------------------------------- the other CLIs

def run_cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_judge_cli_user_errors(tmp_path):
    (tmp_path / "bin.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "bad.json").write_text('{"id": "r", "requirements": "x", "weight": -1, "sub_tasks": []}')
    for argv, where in [(["validate", tmp_path / "none.json"], "none.json"),
                        (["validate", tmp_path / "bin.json"], "bin.json"),
                        (["validate", tmp_path / "bad.json"], "weight"),
                        (["validate"], "rubric"),
                        (["grade", tmp_path, tmp_path, "--grader", "check", "--max-invalid", "x"],
                         "--max-invalid")]:
        out = run_cli("judge.py", *argv)
        assert out.returncode == 2, (argv, out.stderr)
        assert out.stdout == "" and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and where in out.stderr, (argv, out.stderr)


def test_split_cli_user_errors(tmp_path):
    (tmp_path / "bin.jsonl").write_bytes(bytes(range(256)))
    for argv, where in [(["stats", tmp_path / "none.jsonl"], "none.jsonl"),
                        (["stats", tmp_path / "bin.jsonl"], "bin.jsonl:1"),
                        (["stats", good_data(tmp_path), "--context", "ten"], "--context")]:
        out = run_cli("split.py", *argv)
        assert out.returncode == 2 and "Traceback" not in out.stderr, (argv, out.stderr)
        assert one_error_line(out.stderr, "split.py") and where in out.stderr


def test_sandbox_cli_user_errors(tmp_path):
    for argv, where in [([tmp_path / "notask", "--", "true"], "paper.md"),
                        (["--timeout", "soon"], "--timeout")]:
        out = run_cli("sandbox.py", *argv)
        assert out.returncode == 2, (argv, out.stderr)
        assert one_error_line(out.stderr, "sandbox.py") and where in out.stderr


def test_factory_cli_user_errors(tmp_path):
    for argv, where in [(["run", "--out-dir", tmp_path, "--n-tasks", "many"], "--n-tasks"),
                        (["run"], "--out-dir"), (["bake"], "bake")]:
        out = run_cli("factory.py", *argv)
        assert out.returncode == 2, (argv, out.stderr)
        assert one_error_line(out.stderr, "factory.py") and where in out.stderr
