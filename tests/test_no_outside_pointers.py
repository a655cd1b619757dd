"""The repository stands alone: no code, config or doc points at a design file outside it."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_nothing_points_at_a_design_file_outside_the_repository():
    hits = []
    for folder in ("ama_stream", "training", "benchmarks", "configs", "csrc", "docs", "tests", ".ci"):
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and path.suffix in {".py", ".md", ".yaml", ".cpp", ".h", ".cu", ".cuh", ".sh", ""}:
                text = path.read_text(errors="ignore")
                if "DESIGN" + ".md" in text:
                    hits.append(str(path.relative_to(REPO)))
    readme = (REPO / "README.md").read_text()
    assert not hits and "DESIGN" + ".md" not in readme, hits
