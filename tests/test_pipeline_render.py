"""Text grids and the SVG timeline."""

import importlib.util
import xml.etree.ElementTree as ET

import pytest

from colofn.errors import ScheduleError
from colofn.pipeline import (
    KIND_COLORS,
    Schedule,
    format_grid,
    format_timeline,
    gpipe,
    save_timeline,
    simulate,
    timeline_svg,
    zb_h1,
)


def test_grid_of_a_schedule():
    s = Schedule([["0F0", None, "0B0"], ["1F0", "1B0"]], 2, 1, (0, 1), name="x")
    assert format_grid(s) == "\n".join([
        "step     0   1   2",
        "rank 0 0F0   . 0B0",
        "rank 1 1F0 1B0",
    ])
    assert str(s) == format_grid(s)


def test_grid_window_and_mark():
    s = gpipe(2, 6)
    assert format_grid(s, start=3, stop=6, mark=(1, 4)) == "\n".join([
        "step   ...  3   4   5 ...",
        "rank 0    0F3 0F4 0F5",
        "rank 1    1F3 1F4 1F5",
        "              ^^^",
    ])


def test_timeline_grid():
    r = simulate(zb_h1(2, 2))
    assert format_timeline(r) == "\n".join([
        "step     0   1   2   3   4   5   6",
        "rank 0 0F0 0F1   . 0I0 0W0 0I1 0W1",
        "rank 1   . 1F0 1I0 1F1 1I1 1W0 1W1",
    ])
    # A unit of 0.5 doubles the cells; actions then span "-" cells.
    assert format_timeline(r, unit=0.5).splitlines()[1].split()[2:6] == ["0F0", "-", "0F1", "-"]
    with pytest.raises(ScheduleError, match="unit must be > 0"):
        format_timeline(r, unit=0)


def test_svg_is_well_formed_and_coloured():
    r = simulate(zb_h1(3, 4))
    svg = timeline_svg(r)
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    rects = root.findall("{http://www.w3.org/2000/svg}rect")
    boxes = [x for x in rects if x.find("{http://www.w3.org/2000/svg}title") is not None]
    assert len(boxes) == len(r.timeline)
    assert [b.get("fill") for b in boxes] == [KIND_COLORS[e.action.kind] for e in r.timeline]
    assert len({b.get("fill") for b in boxes}) == 3  # F, I and W
    title = root.find("{http://www.w3.org/2000/svg}text").text
    assert title.startswith("zb_h1: 3 ranks, 3 stages, 4 microbatches; makespan")


def test_svg_escapes_names():
    s = Schedule([["0F0", "0B0"]], 1, 1, (0,), name="<a&b>")
    ET.fromstring(timeline_svg(simulate(s)))


def test_save_timeline(tmp_path):
    r = simulate(gpipe(2, 2))
    save_timeline(r, tmp_path / "t.svg")
    assert (tmp_path / "t.svg").read_text() == timeline_svg(r)
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(ScheduleError) as e:
            save_timeline(r, tmp_path / "t.png")
        assert "needs matplotlib, which is not installed; write an .svg instead" in str(e.value)
    else:  # pragma: no cover - matplotlib is optional
        save_timeline(r, tmp_path / "t.png")
        assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
