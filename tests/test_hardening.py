"""Hostile inputs (issue 14, first part): study names cannot touch the filesystem, a path written
into shared storage cannot make a worker delete files, credentials never print, user text in a
Markdown report is not raw HTML."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli
from loopsearch.errors import SpecError
from loopsearch.search import study as studies
from loopsearch.search import workers
from loopsearch.search.space import BASELINE_ATTR
from loopsearch.search.storage import mask

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("url, shown", [
    ("postgresql://u:s3cret@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgresql://:pw@host/db", "postgresql://:***@host/db"),  # no user
    ("postgresql://u:pass word@h/db", "postgresql://u:***@h/db"),  # a space in the password
    ("postgresql://u:a:b@h/db", "postgresql://u:***@h/db"),  # ':' in the password
    ("postgresql://u@h/db?sslpassword=abc&x=1", "postgresql://u@h/db?sslpassword=***&x=1"),
    ("postgresql://u@h/db?password=x;token=y", "postgresql://u@h/db?password=***;token=***"),
    ("cannot reach postgresql://postgres:hunter2@127.0.0.1:5432/test (timeout)",
     "cannot reach postgresql://postgres:***@127.0.0.1:5432/test (timeout)"),
    ("sqlite:///runs/loopsearch.db", "sqlite:///runs/loopsearch.db"),
    ("journal:/tmp/a.journal", "journal:/tmp/a.journal"),
])
def test_mask_hides_every_credential_form(url, shown):
    assert mask(url) == shown


@pytest.mark.parametrize("name", ["../../escape", "/tmp/abs", "a b", "x" * 5000, "[/]x", "a$\\foo$b", "", "..", "-x"])
def test_unsafe_study_names_are_refused_at_create(name, tiny_recipe):
    with pytest.raises(SpecError, match="is not allowed; use 1-100 letters"):
        studies.spec_from_options(name, "early_middle", str(tiny_recipe), None, None, None, None, None)
    if not name:
        return  # on the command line an empty --name means the default name
    r = run_cli("study", "create", "--space", "early_middle", "--recipe", str(tiny_recipe), "--name", name)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_a_resume_dir_written_into_storage_is_never_used(tiny_recipe, tmp_path):
    """Anyone who can write the database could set loopsearch.resume_dir on a queued trial; the
    worker derives the directory itself, so the planted one is neither read nor deleted."""
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "keep.txt").write_text("do not delete")
    spec = studies.spec_from_options("safe", "early_middle", str(tiny_recipe), None, None, None, None, 1)
    st = studies.create(spec)
    for t in st.get_trials():  # the queued baseline: plant the path on it
        st._storage.set_trial_user_attr(t._trial_id, studies.RESUME_ATTR, str(victim))
    assert workers.run("safe", progress=False) == 1
    assert (victim / "keep.txt").read_text() == "do not delete"
    trial = studies.load("safe")[0].get_trials()[0]
    assert trial.user_attrs[BASELINE_ATTR] and trial.user_attrs[studies.RESUME_ATTR].endswith("safe/trial-0000/state")


def test_markdown_report_escapes_html(tiny_recipe, tmp_path):
    space = tmp_path / "space.toml"
    space.write_text('name = "xss"\ndescription = "<script>alert(1)</script>"\nstrategies = ["fixed"]\n'
                     '[block]\nlayers = [1, 3]\nlength = [1, 1]\n[strategy.fixed]\nn_loops = 2\n')
    studies.create(studies.spec_from_options("xss", str(space), str(tiny_recipe), None, None, None, None, 1))
    workers.run("xss", progress=False)
    r = run_cli("report", "xss", "--format", "md", "--output", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text


@pytest.mark.parametrize("args, message", [
    (["leaderboard", "--top", "-1"], "--top"),
    (["leaderboard", "--top", "0"], "--top"),
    (["study", "run", "x", "--timeout", "-5"], "--timeout"),
    (["study", "run", "x", "--n-trials", "-3"], "--n-trials"),
    (["study", "run", "x", "--heartbeat", "10", "--grace", "2"], "--grace 2 must exceed --heartbeat 10"),
    (["study", "create", "--space", "early_middle", "--budget", "1e999"], "budget"),
    (["evaluate", "x", "1", "--metric", "loop_scaling", "--loops", "1-1000000"], "at most 256"),
    (["sample", "x", "1", "--steps", "0"], "--steps"),
    (["sample", "x", "1", "--seq-len", "0"], "--seq-len"),
])
def test_bad_numbers_are_refused_with_one_line(args, message):
    r = run_cli(*args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_reading_commands_do_not_create_a_stray_database(tmp_path, monkeypatch):
    """In the wrong folder, leaderboard / study list say so instead of printing an empty table and
    leaving an empty loopsearch.db behind."""
    monkeypatch.delenv("LOOPSEARCH_STORAGE", raising=False)
    for args in (["leaderboard"], ["study", "list"], ["study", "show", "x"], ["report", "x"], ["compare", "a", "b"]):
        r = run_cli(*args, env={"LOOPSEARCH_STORAGE": ""})
        assert r.returncode == 2 and "no study storage at" in r.stderr, (args, r.stderr)
    assert not (tmp_path / "loopsearch.db").exists()


def test_a_full_disk_leaves_no_half_written_checkpoint_and_is_one_line(tmp_path, monkeypatch):
    """A fake writer raises ENOSPC in the middle of a checkpoint: the previous checkpoint is intact,
    no temporary directory is left, and the CLI turns the error into one line naming the file."""
    import errno

    import torch

    from loopsearch import resume
    from loopsearch.cli import fatal_line

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    gens = {"data": torch.Generator().manual_seed(0)}
    ckpt = resume.Checkpointer(tmp_path / "state", every=1.0)
    first = ckpt.save(resume.TrainState(spent=1.0, steps=1), model, opt, gens)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(resume, "save_file", full)
    with pytest.raises(OSError) as info:
        ckpt.save(resume.TrainState(spent=2.0, steps=2), model, opt, gens)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["ckpt-00000001", "latest"]
    assert ckpt.latest() == first
    line = fatal_line(info.value, [])
    assert line.startswith("no space left on the device writing ") and ".ckpt-00000002.tmp" in line
    assert "artifacts_dir" in line


def test_a_damaged_database_is_one_line(tiny_recipe, tmp_path):
    import os

    db = tmp_path / "broken.db"
    url = f"sqlite:///{db}"
    assert run_cli("study", "create", "--space", "early_middle", "--recipe", str(tiny_recipe), "--name", "b",
                   "--storage", url).returncode == 0
    size = db.stat().st_size
    with open(db, "r+b") as f:  # garbage in the middle of the file
        f.seek(size // 2)
        f.write(os.urandom(4096))
    for args in (("study", "list"), ("leaderboard", "--study", "b"), ("study", "run", "b")):
        r = run_cli(*args, "--storage", url)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 1 and "Traceback" not in r.stderr, (args, r.stderr[-800:])
        assert lines == [f"error: the study database {url} is damaged (malformed) and cannot be read: restore it "
                         f"from a copy, or start a new one with --storage (or LOOPSEARCH_STORAGE)"], (args, lines)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty; give it text"),
    (b"0123456789", "has only 10 bytes; a corpus needs at least 1,000 bytes"),
    (bytes(range(256)) * 10, "is not UTF-8 text (binary data?)"),
    ("é".encode() * 5000 + b"\xff", "is not UTF-8 text"),
])
def test_an_empty_tiny_or_binary_corpus_fails_at_create(tmp_path, content, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    r = run_cli("study", "create", "--space", "early_middle", "--name", "c", "--corpus", str(corpus))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and len(lines) == 1 and message in lines[0], r.stderr
    assert "c" not in studies.study_names()


def test_a_text_corpus_with_a_character_cut_at_the_first_mib_is_accepted(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"a" + "é".encode() * (1 << 20))  # the 1 MiB boundary falls inside a character
    text = {"name": "text", "params": {"train": str(corpus)}}
    spec = studies.spec_from_options("t", "early_middle", None, None, text, None, None, None)
    studies.check_text_corpus(spec)


def test_a_study_finds_its_files_from_another_directory(tmp_path, monkeypatch):
    """Issue 15: paths stored in a study are resolved where it was created, not where a later
    command runs (evaluate --metric genppl from elsewhere silently retrained the reference LM)."""
    from loopsearch.eval.metrics import reference_path

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir(), elsewhere.mkdir()
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    monkeypatch.chdir(here)
    r = run_cli("study", "create", "--space", "early_middle", "--name", "home", "--storage", storage, cwd=here)
    assert r.returncode == 0, r.stderr
    monkeypatch.chdir(elsewhere)
    _, spec = studies.load("home", storage)
    assert Path(spec.artifacts_dir) == (here / "loopsearch_runs").resolve()
    assert reference_path(spec).is_relative_to(here.resolve())
