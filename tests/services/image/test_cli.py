"""`specmesh image generate` in-process on the tiny trained models: a PNG grid, the same images
for the same seed, and a one-line error for a foreseeable mistake."""

from __future__ import annotations

from services.image import png
from specmesh.cli.main import main


def test_generate_writes_a_grid_and_a_seed_fixes_it(tiny_image_dir, tmp_path, capsys) -> None:
    args = ["image", "generate", "--class", "3", "--n", "4", "--method", "lantern", "--seed", "9"]
    args += ["--model-dir", str(tiny_image_dir)]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    assert "4 images of class 3 (lantern)" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b.png")]) == 0
    a = png.decode_png((tmp_path / "a.png").read_bytes())
    assert a.shape == (4 * (1 * 17 + 1), 4 * (4 * 17 + 1))  # one row of 4, 1-px gaps, scaled 4x
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_foreseeable_errors_are_one_line(tiny_image_dir, tmp_path, capsys) -> None:
    code = main(
        [
            "image",
            "generate",
            "--class",
            "12",
            "--model-dir",
            str(tiny_image_dir),
            "--out",
            str(tmp_path / "x.png"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "class 12 is not a digit class" in err and "Traceback" not in err
    code = main(["image", "generate", "--class", "1", "--model-dir", str(tmp_path / "none")])
    assert code == 2 and "specmesh train image" in capsys.readouterr().err
