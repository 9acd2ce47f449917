"""Stage folders appear whole or not at all, also when two runs compute the same stage at once."""

import threading
from pathlib import Path

import pytest

from mlpipe.store import final_path, stage_dir


def test_a_failed_stage_leaves_nothing(state):
    with pytest.raises(RuntimeError), stage_dir("split", "k1") as out:
        (out / "part.csv").write_text("half")
        raise RuntimeError("stage failed")
    assert not final_path("split", "k1").exists()
    assert list(final_path("split", "k1").parent.iterdir()) == []


def test_a_run_that_places_the_same_key_first_wins_and_the_other_run_goes_on(state, monkeypatch):
    """Two runs computing one stage key side by side (the load test's first two runs): the second
    run's check sees no folder, then the first run renames its folder into place. The second keeps
    the first's (same key, same output) instead of failing, and leaves no temporary folder."""
    final = final_path("ingest", "same")
    real_exists, raced = Path.exists, []

    def place_theirs() -> None:
        with stage_dir("ingest", "same") as theirs:
            (theirs / "report.json").write_text("theirs")

    def other_run_placed_it_after_the_check(path: Path) -> bool:
        if path == final and not raced:
            raced.append(path)
            other = threading.Thread(target=place_theirs)  # the other run (its own temporary folder) finishes first
            other.start()
            other.join()
            return False  # what this run's check saw a moment before
        return real_exists(path)

    with stage_dir("ingest", "same") as ours:
        (ours / "report.json").write_text("ours")
        monkeypatch.setattr(Path, "exists", other_run_placed_it_after_the_check)
    monkeypatch.undo()
    assert raced
    assert (final / "report.json").read_text() == "theirs"
    assert sorted(p.name for p in final.parent.iterdir()) == ["same"]


def test_a_recomputed_key_replaces_the_folder_whole(state):
    for content in ("first", "second"):
        with stage_dir("label", "k") as out:
            (out / "items.txt").write_text(content)
    assert (final_path("label", "k") / "items.txt").read_text() == "second"
    assert sorted(p.name for p in final_path("label", "k").parent.iterdir()) == ["k"]
