"""report's interactive page: the recording's clock throughout, the rules in force, and the page in a real Chromium."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from cabin_monitor.config import RulesConfig, merge_rules
from cabin_monitor.record.format import RulesChange
from cabin_monitor.record.replay import RulesChoice, SessionReplay, alerts, replay_session, summarize
from cabin_monitor.tools.report_page import SessionView, page, thin, timeline
from tests.support.browser import OpenPage, open_offline
from tests.support.sessions import ANGRY_S, CAPTURE_T0_S, WALL_T0_S, long_session

ROW = re.compile(
    r"<tr class='event'[^>]*data-plot='([^']+)' data-at-s='([^']+)' data-start-s='([^']+)' data-end-s='([^']+)'"
)


def view(replay: SessionReplay) -> SessionView:
    """The page's view of a replay of ``long_session``, the recording's own rules being the defaults."""
    return SessionView(replay, alerts(replay), RulesConfig())


@pytest.fixture(scope="module")
def long_replay() -> SessionReplay:
    """``long_session`` replayed with its own rules, traced."""
    return replay_session(long_session(), trace=True)


def test_thin_keeps_each_buckets_lowest_and_highest_value_and_its_gaps() -> None:
    """A series longer than the limit keeps, per bucket, its extremes in time order, and a gap where one was."""
    times = [float(i) for i in range(12)]
    values: list[float | None] = [0.1, 0.9, 0.5, 0.2, None, 0.3, 0.4, 0.8, 0.0, 0.6, 0.7, 0.65]
    assert thin(times, values, 100) == (times, values)
    x, y = thin(times, values, 8)  # buckets of 3
    assert list(zip(x, y, strict=True)) == [
        (0.0, 0.1), (1.0, 0.9),  # [0.1, 0.9, 0.5]
        (3.0, None), (3.0, 0.2), (5.0, 0.3),  # [0.2, None, 0.3]: a gap kept
        (7.0, 0.8), (8.0, 0.0),  # [0.4, 0.8, 0.0]
        (9.0, 0.6), (10.0, 0.7),  # [0.6, 0.7, 0.65]
    ]  # fmt: skip


def test_page_times_run_on_the_recordings_clock_not_the_wall_clock(long_replay: SessionReplay) -> None:
    """Event times, windows and shading are seconds of the recording's own clock, though its wall clock ran at half."""
    html = page([view(long_replay)], summarize([long_replay], [alerts(long_replay)]), "own")
    rows = ROW.findall(html)
    assert len(rows) == len(long_replay.events) >= 4
    for (_, at_s, _, _), event in zip(rows, long_replay.events, strict=True):
        own_clock_s = event.capture_s - CAPTURE_T0_S
        assert float(at_s) == pytest.approx(own_clock_s, abs=1e-3)
        assert abs((event.wall_time_s - WALL_T0_S) - own_clock_s) > 100  # the wall clock would put it elsewhere
    stress = [a for a in alerts(long_replay) if a.type == "stress"]
    assert [round(a.start_s - CAPTURE_T0_S) for a in stress] == [round(s + 3.7) for s, _ in ANGRY_S]
    figure = timeline(long_replay, "occupant-1", alerts(long_replay))
    (shading,) = [t for t in figure.data if t.name == "stress events"]
    assert list(shading.x[::6]) == pytest.approx([a.start_s - CAPTURE_T0_S for a in stress], abs=1e-3)
    assert figure.layout.xaxis3.range == pytest.approx((0.0, long_replay.duration_s))


def test_the_onset_panel_draws_baseline_plus_min_rise(long_replay: SessionReplay) -> None:
    """The unexpected-expression panel has a 'baseline + min_rise' line, min_rise above the baseline throughout."""
    figure = timeline(long_replay, "occupant-1", alerts(long_replay))
    lines = {t.name: t for t in figure.data if t.yaxis == "y2"}
    assert {"fast average", "baseline", "baseline + min_rise", "min_score = 0.5", "exit_score = 0.3"} <= set(lines)
    rise = RulesConfig().unexpected_expression.min_rise
    baseline, level = lines["baseline"].y, lines["baseline + min_rise"].y
    assert len(level) == len(baseline) > 1000
    assert all(b is not None and lv == pytest.approx(b + rise, abs=1e-3) for b, lv in zip(baseline, level, strict=True))


def test_rules_changed_by_set_and_while_recording_are_shown() -> None:
    """A --set value is highlighted against the recording's own; a change made while recording is listed at its time."""
    items = long_session(minutes=2)
    changed = merge_rules(RulesConfig(), {"unexpected_expression": {"min_rise": 0.4}})
    items.insert(601, RulesChange(CAPTURE_T0_S + 60.0, WALL_T0_S + 30.0, changed))
    replay = replay_session(items, RulesChoice(patch={"stress": {"enter_score": 0.7}}), trace=True)
    html = page([view(replay)], summarize([replay], [alerts(replay)]), "each recording's own rules, with --set ...")
    assert "1 value differs from the recording's own rules: <code>rules.stress.enter_score</code>" in html
    assert "<tr class='changed'><td>rules.stress.enter_score</td><td>0.7</td><td>0.6</td></tr>" in html
    assert "<tr><td>rules.stress.exit_score</td><td>0.4</td><td>0.4</td></tr>" in html
    assert "at 60.00 s: <code>rules.unexpected_expression.min_rise</code> 0.3 → 0.4</li>" in html
    assert "enter_score = 0.7" in html


# -- in a real browser ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(long_replay: SessionReplay, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenPage]:
    """``long_session``'s report page, loaded from a file in Chromium with the network off."""
    path = tmp_path_factory.mktemp("page") / "index.html"
    path.write_text(page([view(long_replay)], summarize([long_replay], [alerts(long_replay)]), "own"), "utf-8")
    with open_offline(path, "[...document.querySelectorAll('.js-plotly-plot')].every(d => d._fullLayout)") as opened:
        yield opened


X_RANGES = "id => ['xaxis', 'xaxis2', 'xaxis3'].map(k => document.getElementById(id)._fullLayout[k].range)"


def test_the_page_loads_offline_without_errors_and_draws_every_panel(browser: OpenPage) -> None:
    """No console error, no request but the page itself, and each panel with its series, thresholds and shading."""
    assert browser.errors == []
    assert [url for url in browser.requests if not url.startswith("file:")] == []
    drawn = browser.page.evaluate(
        "[...document.querySelectorAll('.js-plotly-plot')].map(d => ({id: d.id,"
        " panels: [...d.querySelectorAll('.cartesianlayer > .subplot')].map(s =>"
        " [...s.querySelectorAll('g.trace.scatter path.js-line, g.trace.scatter path.js-fill')]"
        ".filter(p => (p.getAttribute('d') || '').length > 10).length)}))"
    )
    assert [d["id"] for d in drawn] == ["timeline-0-occupant-1"]
    # stress: score, 2 thresholds, shading; onset: 3 series, 2 thresholds, shading; strip: in view
    stress, onset, strip = drawn[0]["panels"]
    assert stress >= 4 and onset >= 6 and strip >= 1


def test_dragging_across_a_panel_zooms_every_panel_in_time(browser: OpenPage) -> None:
    """A drag over a tenth of the stress panel narrows the x range of all panels alike; y stays put."""
    tab = browser.page
    tab.evaluate("id => Plotly.relayout(id, {'xaxis.autorange': true})", "timeline-0-occupant-1")
    (full, _, _) = tab.evaluate(X_RANGES, "timeline-0-occupant-1")
    drag = tab.locator("#timeline-0-occupant-1 .draglayer .xy .nsewdrag").first
    drag.scroll_into_view_if_needed()
    box = drag.bounding_box()
    y = box["y"] + box["height"] / 2
    tab.mouse.move(box["x"] + 0.4 * box["width"], y)
    tab.mouse.down()
    tab.mouse.move(box["x"] + 0.5 * box["width"], y, steps=5)
    tab.mouse.up()
    tab.wait_for_function(f"({X_RANGES})('timeline-0-occupant-1')[0][1] < {full[1] * 0.9}")
    ranges = tab.evaluate(X_RANGES, "timeline-0-occupant-1")
    assert ranges[0] == ranges[1] == ranges[2]
    span = full[1] - full[0]
    assert ranges[0][0] == pytest.approx(full[0] + 0.4 * span, abs=0.02 * span)
    assert ranges[0][1] == pytest.approx(full[0] + 0.5 * span, abs=0.02 * span)


def test_clicking_an_event_row_shows_its_window(browser: OpenPage, long_replay: SessionReplay) -> None:
    """Clicking the second stress start zooms its occupant's timeline onto that alert, start to end."""
    tab = browser.page
    row = tab.locator("tr.event", has_text="stress").filter(has_text="start").nth(1)
    start_s, end_s = float(row.get_attribute("data-start-s")), float(row.get_attribute("data-end-s"))
    second = [a for a in alerts(long_replay) if a.type == "stress"][1]
    assert (start_s, end_s) == pytest.approx((second.start_s - CAPTURE_T0_S, second.end_s - CAPTURE_T0_S), abs=1e-3)
    row.click()
    tab.wait_for_function(
        f"({X_RANGES})('timeline-0-occupant-1').every(r => r[0] <= {start_s} && r[1] >= {end_s}"
        f" && r[1] - r[0] < {4 * (end_s - start_s)})"
    )
    for low, high in tab.evaluate(X_RANGES, "timeline-0-occupant-1"):
        assert low <= start_s < end_s <= high
        assert high - low < 4 * (end_s - start_s)
    assert "shown" in (row.get_attribute("class") or "")
