"""The extraction bench's bookkeeping: the baseline's batches are the run's own (parts cut in
record order, each batched on its own, packed or length-sorted), and the sustained rate skips the
pipeline's fill."""

from __future__ import annotations

import numpy as np
import pytest

from bench.extract_speed import padding_efficiency, run_batches, sustained_rate
from pipeline.batching import length_sorted_batches


def test_run_batches_cut_parts_in_record_order_then_sort_within_each():
    lengths = np.array([5, 9, 3, 8, 2, 7, 6, 4])
    batches = run_batches(lengths, batch_tokens=16, part_tokens=16, batching="padded")
    # parts: [5, 9, 3] (17 tokens), [8, 2, 7] (17), [6, 4]; each batched on its own
    expected = [b for start, stop in ((0, 3), (3, 6), (6, 8))
                for b in (batch + start for batch in length_sorted_batches(lengths[start:stop], 16))]
    assert [b.tolist() for b in batches] == [b.tolist() for b in expected]
    assert sorted(i for b in batches for i in b.tolist()) == list(range(8))
    assert padding_efficiency(lengths, batches) == pytest.approx(44 / sum(len(b) * lengths[b].max() for b in batches))
    # a long and a short sample per part: batched part by part they pad each other, a global sort does not
    mixed = np.array([10, 1, 10, 1, 10, 1])
    assert padding_efficiency(mixed, run_batches(mixed, batch_tokens=20, part_tokens=11, batching="padded")) == pytest.approx(33 / 60)
    assert padding_efficiency(mixed, length_sorted_batches(mixed, 20)) == pytest.approx(33 / 42)  # [10,10] [10,1] [1,1]


def test_packed_run_batches_keep_record_order_within_each_part():
    lengths = np.array([5, 9, 3, 8, 2, 7, 6, 4])
    batches = run_batches(lengths, batch_tokens=16, part_tokens=16)  # packed, the default
    # parts [5, 9, 3], [8, 2, 7], [6, 4]; within each, consecutive samples up to 16 real tokens
    assert [b.tolist() for b in batches] == [[0, 1], [2], [3, 4], [5], [6, 7]]
    assert padding_efficiency(lengths, batches, "packed") == 1.0


def test_sustained_rate_counts_from_the_end_of_the_first_quarter():
    seals = [(1.0, 100), (5.0, 100), (6.0, 100), (7.0, 100), (8.0, 100), (9.0, 100), (10.0, 100), (11.0, 100)]
    # the 2nd seal ends the first quarter: 6 parts of 100 tokens from t=5 to t=11
    assert sustained_rate(seals) == pytest.approx(600 / 6.0)
    assert sustained_rate(seals[:3]) is None


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/task").is_dir(), reason="reads Linux /proc")
def test_thread_cpu_attributes_a_busy_thread_to_its_group():
    import threading
    import time

    from bench.thread_probes import group_of, thread_cpu

    assert group_of("talon-encode_3") == "talon-encode" and group_of("talon-part-writer-12") == "talon-part-writer"
    assert group_of("MainThread") == "MainThread"

    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds  # this thread's own CPU time
        while time.thread_time() < end:
            pass

    with thread_cpu(interval=0.05) as report:
        worker = threading.Thread(target=spin, args=(0.3,), name="bench-spin-0")
        worker.start()
        worker.join()
    # the spinning thread burnt >= 0.3 CPU-seconds, counted whether read before or after it ended
    spun = report.groups.get("bench-spin", 0.0) + report.groups.get("(ended unread)", 0.0)
    assert spun * report.wall >= 0.2
    assert report.process * report.wall >= spun * report.wall - 0.05
    assert 0.0 <= report.host_busy <= 1.0
    assert "bench-spin" in report.table() or "(ended unread)" in report.table()


def test_gil_probe_percentiles_and_report():
    from bench.thread_probes import ThreadCpuReport, gil_probe, wait_percentiles

    assert wait_percentiles([]) == {}
    late = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert wait_percentiles(late) == {"median": 50.0, "p90": 90.0, "p99": 99.0, "count": 100.0}
    assert wait_percentiles([0.004]) == {"median": 4.0, "p90": 4.0, "p99": 4.0, "count": 1.0}
    report = ThreadCpuReport(wall=1.0, groups={"x": 1.0}, gil_wait_ms=wait_percentiles(late))
    assert "late by 50.00 ms (median), 90.00 (p90), 99.00 (p99) over 100 wake-ups" in report.table()
    collected: list[float] = []
    with gil_probe(collected, sleep=0.001):
        import time

        time.sleep(0.05)
    assert collected and all(value >= 0.0 for value in collected)


def test_pretokenized_replays_the_run_paths_stream_and_restores_it(smollm2_dir, chat_jsonl):
    from transformers import AutoTokenizer

    import stage_extract.run as run_path
    from bench.extract_speed import pretokenized
    from stage_extract.records import RecordStats, iter_chat_records
    from stage_extract.tokenize_ahead import tokenize_ahead

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))

    def stream(function):
        stats = RecordStats()
        items = [(item.record.record_index, item.wanted, None if item.tokens is None else item.tokens.input_ids.tolist(),
                  item.stats)
                 for item in function(iter_chat_records(str(chat_jsonl), stats=stats), stats, tokenizer, max_length=64,
                                      wanted=lambda record: record.record_index % 2 == 0)]
        return items, stats.as_dict()

    expected = stream(tokenize_ahead)
    assert any(tokens for _, _, tokens, _ in expected[0]) and any(not wanted for _, wanted, _, _ in expected[0])
    with pretokenized(chat_jsonl, tokenizer, 64):
        assert run_path.tokenize_ahead is not tokenize_ahead
        assert stream(run_path.tokenize_ahead) == expected  # the same items and final reader counts
    assert run_path.tokenize_ahead is tokenize_ahead
