"""The jdlora command: subcommands, help, output, plots and errors."""

import subprocess
import sys


from jdlora.cli import main


def test_help_lists_every_subcommand_and_each_has_help():
    out = subprocess.run(["jdlora", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("compress", "tune", "demo"):
        assert command in out
        sub = subprocess.run([sys.executable, "-m", "jdlora.cli", command, "--help"], capture_output=True, text=True,
                             check=True).stdout
        assert f"usage: jdlora {command}" in sub


def test_compress_prints_settings_errors_and_parameters(real_adapters, capsys):
    assert main(["compress", *map(str, real_adapters), "--rank", "4", "--clusters", "2"]) == 0
    out = capsys.readouterr().out
    assert "adapters            5" in out and "clusters            2" in out
    assert "parameters before" in out and "parameters after" in out
    for adapter in real_adapters:
        assert adapter.name in out


def _table_rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.split() and line.split()[0] in ("full", "diag")]


def test_tune_shows_used_ranks_positive_savings_and_the_cheapest_setting(real_adapters, tmp_path, capsys):
    plot = tmp_path / "tune.png"
    # 5 adapters of ranks 4 and 8 on k: at most 24 directions, so 32 and 64 are tried as 24, once.
    assert main(["tune", *map(str, real_adapters), "--ranks", "2,4,32,64", "--target-error", "0.5",
                 "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(plot) in out
    rows = _table_rows(out)
    settings = [(int(r[1]), int(r[2])) for r in rows]
    assert len(settings) == len(set(settings)), "every row is a distinct setting"
    assert all(not r[6].startswith("-") for r in rows), "settings that store more than the LoRAs are skipped"
    assert "Cheapest setting whose worst adapter error is <= 0.5" in out or "No setting here" in out


def test_compress_prints_the_settings_tried_and_why_it_chose(real_adapters, capsys):
    assert main(["compress", *map(str, real_adapters), "--target-error", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "Settings tried on" in out and "automatic choice" in out
    assert sum("<- chosen" in line for line in out.splitlines()) == 1 or "No setting storing" in out


def test_demo_runs_without_input_and_plots_the_settings_it_tried(capsys, tmp_path):
    assert main(["demo", "--adapters", "8", "--layers", "2", "--hidden", "64", "--plot", str(tmp_path / "d.png")]) == 0
    out = capsys.readouterr().out
    assert "adapters            8" in out and "parameters saved" in out and "automatic choice" in out
    assert (tmp_path / "d.png").exists() and len(_table_rows(out)) > 2


def test_bad_adapter_folder_exits_2_naming_the_file(tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    assert main(["compress", str(folder), "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert "jdlora: error:" in err and "broken" in err
