"""``colofn train``'s report: communication per step by collective, peak memory per rank, the --check difference on a log scale."""

from __future__ import annotations

import io
import json

from colofn.train import TrainConfig, parse_mesh, train
from colofn.train.loop import Progress
from colofn.train.report import loss_curve_svg


def test_report_has_communication_by_collective_memory_and_the_check_difference(tmp_path):
    out = tmp_path / "out"
    cfg = TrainConfig(mesh=tuple(parse_mesh("dp=2").items()), out=str(out), steps=2, warmup=1, check=True)
    assert train(cfg) == 0
    record = json.loads((out / "record.json").read_text())
    comm = record["comm_per_step"]
    # plain dp: the gradient buckets in the backward, the loss's (sum, count) riding at the end of the last
    assert set(comm) == {"all_reduce over dp, backward"}
    assert comm["all_reduce over dp, backward"][1] > 0
    assert len(record["peak_rss_per_rank"]) == 2 and all(b > 0 for b in record["peak_rss_per_rank"])
    report = (out / "report.md").read_text()
    assert "communication per step" in report and "all_reduce over dp, backward" in report
    assert "peak resident memory per rank" in report
    assert "log scale" in (out / "loss_curve.svg").read_text()
    split = record["time_split"]  # the parts of step 2 on each rank, which add up to at most the step
    assert record["time_split_steps"] == [2, 2] and set(split) == {"step", "compute", "communication", "wait"}
    for r in range(2):
        parts = [split[k][r] for k in ("compute", "communication", "wait")]
        assert all(p >= 0 for p in parts) and split["communication"][r] > 0  # dp=2 waits for its buckets
        assert sum(parts) <= split["step"][r] * (1 + 1e-9)
    assert min(split["wait"]) == 0.0  # the rank blocked least waited for no one
    assert "rank 1: " in report and "compute + communication + wait" in report


def test_difference_panel_only_with_a_check_and_exact_zeros_at_the_floor():
    plain = loss_curve_svg([1, 2, 3], [3.0, 2.5, 2.0], [None, None, None])
    assert "log scale" not in plain and 'height="360"' in plain
    checked = loss_curve_svg([1, 2, 3], [3.0, 2.5, 2.0], [3.0, 2.5 + 2**-20, 2.0 + 2**-10])  # exact differences
    assert "log scale" in checked and 'height="560"' in checked
    assert ">1e-7<" in checked and ">1e-3<" in checked  # the decades around 9.5e-7 and 9.8e-4 (0: at the floor)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_on_a_terminal_and_writes_lines_to_a_log():
    log, term = io.StringIO(), _Terminal()
    for stream in (log, term):
        p = Progress(stream)
        p.update(1, 2, "loss 1.0")
        p.note("  saved ckpt")
        p.update(2, 2, "loss 0.5")
    assert log.getvalue() == "[##########          ] step    1/2 | loss 1.0\n  saved ckpt\n[####################] step    2/2 | loss 0.5\n"
    assert term.getvalue() == ("\r\x1b[K[##########          ] step    1/2 | loss 1.0" "\n  saved ckpt\n"
                               "\r\x1b[K[####################] step    2/2 | loss 0.5\n")
