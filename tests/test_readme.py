"""The README holds exactly two set-up commands and .ci/run runs the test one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```\n(.*?)\n```", setup, flags=re.S)
    assert len(commands) == 2
    main_job, tests = commands
    assert "pipeline --model demo" in main_job and "pytest" in tests
    assert tests in (REPO / ".ci" / "run").read_text().splitlines()


def test_no_merge_conflict_markers_left():
    """Two merges left conflict markers in README.md / BENCHMARKS.md before this check existed."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    try:
        files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(root)) for p in root.rglob("*.md")]
    bad = []
    for name in files:
        if not name.endswith((".md", ".py", ".toml", ".sh", ".txt", ".pbtxt")):
            continue
        for i, line in enumerate((root / name).read_text(errors="replace").splitlines(), 1):
            if line.startswith(("<<<<<<< ", ">>>>>>> ")):
                bad.append(f"{name}:{i}")
    assert not bad, bad
