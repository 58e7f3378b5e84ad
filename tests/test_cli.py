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


def test_tune_prints_the_sweep_and_saves_a_png(real_adapters, tmp_path, capsys):
    plot = tmp_path / "tune.png"
    assert main(["tune", *map(str, real_adapters), "--ranks", "2,4", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "rank" in out and "clusters" in out and str(plot) in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line.split() for line in out.splitlines() if line[:2].strip().isdigit()]
    # ranks 2, 4 and the section 6.4 rank (5 / 2 + 7 = 10, clamped to the stacked rank) x clusters 1, 2, 4, 5
    assert {(int(r[0]), int(r[1])) for r in rows} >= {(2, 1), (2, 2), (4, 4), (4, 5)}


def test_demo_runs_without_input(capsys, tmp_path):
    assert main(["demo", "--adapters", "8", "--layers", "2", "--hidden", "64", "--plot", str(tmp_path / "d.png")]) == 0
    out = capsys.readouterr().out
    assert "adapters            8" in out and "parameters saved" in out
    assert (tmp_path / "d.png").exists()


def test_bad_adapter_folder_exits_2_naming_the_file(tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    assert main(["compress", str(folder), "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert "jdlora: error:" in err and "broken" in err
