"""bench/results.py: the host CPU read from cpuinfo, `append_results` adding a section with
device, date, git sha and command after what the file already holds, and `report` (a benchmark's
ending) recording only when asked; a benchmark refusing a bad flag by name before any work
(bench/kd_cache.py --positions)."""
import platform
import sys

import pytest

from bench.results import append_results, host_cpu, report


def test_host_cpu_reads_the_model_name_and_falls_back(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core Processor\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 9654 96-Core Processor\n")
    assert host_cpu(str(info)) == "AMD EPYC 9654 96-Core Processor"
    fallback = platform.processor() or platform.machine()
    info.write_text("processor\t: 0\nmodel name\t:\n")  # an empty model name is not a name
    assert host_cpu(str(info)) == fallback
    assert host_cpu(str(tmp_path / "missing")) == fallback


def test_append_results_keeps_history_and_names_device_git_command(tmp_path, monkeypatch):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## older: 2026-01-01 00:00 UTC\n\n| a |\n|---|\n| 1 |\n")
    monkeypatch.setenv("VPMOE_RESULTS", str(path))
    append_results("probe", "python3 bench/x.py --y", [{"ms": 1.23456, "name": "z"}, {"ms": 2}], notes="n1")
    text = path.read_text()
    assert text.startswith("# Benchmark results\n\n## older: 2026-01-01 00:00 UTC\n\n| a |\n|---|\n| 1 |\n")
    section = text.split("\n## probe: ")[1]
    assert "- device: " in section and host_cpu() in section and "- git: " in section  # CPU or GPU host
    assert "- command: `python3 bench/x.py --y`\n- notes: n1\n" in section
    assert section.endswith("| ms | name |\n|---|---|\n| 1.235 | z |\n| 2 |  |\n")


def test_report_records_only_when_asked_with_the_command_as_run(tmp_path, monkeypatch, capsys):
    path = tmp_path / "RESULTS.md"
    monkeypatch.setenv("VPMOE_RESULTS", str(path))
    monkeypatch.setattr(sys, "argv", ["/somewhere/bench/probe.py", "--cases", "a", "--record"])
    rows = [{"ms": 1.5}]
    report("probe", rows, record=False, notes="n2")
    assert not path.exists()
    assert capsys.readouterr().out == "n2\n| ms |\n|---|\n| 1.5 |\n\n"
    report("probe", rows, record=True, notes="n2")
    section = path.read_text().split("\n## probe: ")[1]
    assert "- command: `python bench/probe.py --cases a --record`\n- notes: n2\n" in section
    assert section.endswith("| ms |\n|---|\n| 1.5 |\n")
    report("other", rows, record=True, command="python3 bench/probe.py --given")
    assert "- command: `python3 bench/probe.py --given`\n\n" in path.read_text().split("\n## other: ")[1]


def test_kd_cache_bench_names_a_bad_positions_flag(capsys):
    """--positions must cover whole teacher sequences: under 256 it used to die in torch.cat."""
    from bench.kd_cache import main

    for bad in ("100", "300"):
        with pytest.raises(SystemExit) as err:
            main(["--positions", bad, "--no-record"])
        assert err.value.code == 2
        assert f"--positions {bad}: must be a positive multiple of 256" in capsys.readouterr().err
