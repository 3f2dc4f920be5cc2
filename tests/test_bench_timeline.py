"""bench/timeline.py's summary of a multi-stream kernel timeline, on made-up timelines whose answers
are worked out by hand (no GPU)."""
from bench.timeline import summary_lines


def test_summary_counts_idle_and_one_stream_alone_time():
    # stream 1 runs a 0-10 us and c 30-40, stream 2 runs b 5-15 and d 32-34; nothing runs 15-30
    spans = [(0.0, 10.0, 1, "a"), (5.0, 15.0, 2, "b"), (30.0, 40.0, 1, "c"), (32.0, 34.0, 2, "d")]
    lines = summary_lines(spans)
    # alone: a 0-5, b 10-15, c 30-32 and 34-40; idle 15-30
    assert lines[0] == "# timeline: 4 kernels over 0.040 ms; no stream busy 0.015 ms; one stream alone 0.018 ms"
    assert lines[1:3] == ["#   stream 1: busy 0.020 ms, 2 kernels", "#   stream 2: busy 0.012 ms, 2 kernels"]
    assert lines[3:] == ["#   alone    0.008 ms  c", "#   alone    0.005 ms  a", "#   alone    0.005 ms  b"]


def test_back_to_back_kernels_on_one_stream_are_not_idle():
    spans = [(0.0, 4.0, 7, "x"), (4.0, 9.0, 7, "y")]
    lines = summary_lines(spans)
    assert lines[0] == "# timeline: 2 kernels over 0.009 ms; no stream busy 0.000 ms; one stream alone 0.009 ms"
    assert summary_lines([]) == ["# timeline: no kernels recorded"]
