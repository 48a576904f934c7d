"""Every published number comes from the records: the committed BENCHMARKS.md and README.md match what
`python -m benchmarks.report` generates from benchmarks/results/, and a block that does not is caught."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_committed_text_matches_the_records():
    r = subprocess.run([sys.executable, "-m", "benchmarks.report", "--check"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_a_block_edited_by_hand_fails_the_check(tmp_path, monkeypatch):
    from benchmarks import report

    doc = tmp_path / "B.md"
    doc.write_text("intro\n<!-- report:verdicts -->\nhand-written numbers\n<!-- /report:verdicts -->\noutro\n")
    monkeypatch.setattr(report, "DOCS", {"B.md": doc})
    assert report.main(["--check"]) == 1  # the committed block differs from the records
    assert report.main(["--no-figures"]) == 0 and "hand-written" not in doc.read_text()  # regenerated ...
    assert report.main(["--check"]) == 0  # ... and now it matches
    assert doc.read_text().startswith("intro\n<!-- report:verdicts -->\n| regime |") and doc.read_text().endswith("outro\n")
    doc.write_text("<!-- report:no-such-block -->\nx\n<!-- /report:no-such-block -->\n")
    try:
        report.main(["--check"])
        raise AssertionError("an unknown block must stop the report")
    except SystemExit as e:
        assert "unknown report block 'no-such-block'" in str(e)
