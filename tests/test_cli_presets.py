"""`sslaudio presets`: one line per preset at any width; `presets NAME`: its description and YAML."""

from typer.testing import CliRunner

from sslaudio.build import load_preset
from sslaudio.cli import app
from sslaudio.config import list_presets

runner = CliRunner()


def test_one_line_per_preset_within_80_columns():
    r = runner.invoke(app, ["presets"], terminal_width=80)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    names = list_presets()
    rows = {ln.split()[0]: ln.split() for ln in lines[1:] if ln and ln.split()[0] in names}
    assert lines[0].split() == ["preset", "method", "encoder", "input"]
    assert set(rows) == set(names) and len(lines) == len(names) + 3  # header, rows, blank, hint
    assert max(len(ln) for ln in lines) <= 80
    m2d = load_preset("tiny/m2d")
    assert rows["tiny/m2d"] == ["tiny/m2d", "m2d", "vit", "logmel", "80", f"{m2d.data.clip_seconds:g}s", "16kHz"]
    assert "presets NAME" in lines[-1]


def test_presets_name_prints_the_description_and_a_usable_yaml(tmp_path):
    r = runner.invoke(app, ["presets", "tiny/m2d"])
    assert r.exit_code == 0, r.output
    p = load_preset("tiny/m2d")
    assert r.output.startswith("# tiny/m2d: method m2d, encoder vit, input logmel 80")
    assert f"# {p.description}" in r.output
    (tmp_path / "my.yaml").write_text(r.output)  # comments and all: a preset file to edit
    assert load_preset(str(tmp_path / "my.yaml")).to_dict() == p.to_dict()


def test_unknown_preset_is_one_line_with_a_suggestion():
    r = runner.invoke(app, ["presets", "tiny/m2x"])
    assert r.exit_code == 2
    assert "unknown preset 'tiny/m2x' (did you mean 'tiny/m2d'?)" in r.output and "Traceback" not in r.output
