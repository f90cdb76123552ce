"""The live progress line."""

from __future__ import annotations

import io

from pipeline.progress import Progress


def test_progress_line_says_planning_until_the_total_is_final():
    out = io.StringIO()
    p = Progress(0, stream=out, every_s=0.0, planning=True)
    p.add(8)
    p.update(4, 4)
    assert "4/8+ (planning) items" in out.getvalue() and "ETA ?" in out.getvalue()
    p.planning = False
    p.update(4, 4)
    assert out.getvalue().splitlines()[-1].startswith("[genpipe] 8/8 items")


def test_finish_prints_the_complete_line_once():
    out = io.StringIO()
    p = Progress(0, stream=out, every_s=0.0, planning=True)
    p.add(8)
    p.update(4, 4)
    p.update(4, 4)  # all done, but the plan could still have grown: no final line yet
    assert out.getvalue().splitlines()[-1].startswith("[genpipe] 8/8+ (planning)")
    p.finish()
    assert out.getvalue().splitlines()[-1].startswith("[genpipe] 8/8 items")
    lines = len(out.getvalue().splitlines())
    p.finish()
    assert len(out.getvalue().splitlines()) == lines
