"""deblur.infer: both size modes, the CLI's outputs, refusals and per-file errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cli_checks import command, error_line, files, in_small_filesystem, run_cli
from PIL import Image
from safetensors.torch import save_file

from deblur.infer import main, restore, restore_resize, restore_tiles
from deblur.models import Generator
from deblur.weights import save_generator


def _trained_like_generator(seed=0) -> Generator:
    """A generator that is not the identity (the residual init's last layer is zero)."""
    torch.manual_seed(seed)
    g = Generator(residual=True)
    torch.nn.init.normal_(g.dec6.weight, std=0.02)
    return g.eval()


@pytest.fixture
def weights(tmp_path):
    return save_generator(_trained_like_generator(), tmp_path / "w" / "generator.safetensors")


def _photo(path, size=(90, 70), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("size", [(64, 64), (100, 130), (10, 7)])
def test_tiles_blend_to_the_image_under_an_identity_generator(size):
    # an untrained residual generator is exactly the identity: any error in padding, windows,
    # folding or cropping would show up as a difference
    g = Generator(residual=True).eval()
    x = torch.rand(1, 3, *size)
    assert torch.allclose(restore_tiles(g, x), x, atol=1e-5)
    assert torch.allclose(restore_resize(g, x), x, atol=1e-5)


def test_tiles_do_not_depend_on_the_batch_size():
    g = _trained_like_generator()
    x = torch.rand(1, 3, 80, 150)
    one = restore_tiles(g, x, batch_size=1)
    many = restore_tiles(g, x, batch_size=64)
    assert torch.allclose(one, many, atol=1e-5)
    assert not torch.allclose(one, x, atol=1e-2)  # the generator did change the image


def test_resize_mode_on_a_64px_image_is_the_generator_output():
    g = _trained_like_generator()
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(restore_resize(g, x), restore(g, x))


def test_resize_mode_keeps_the_size_and_adds_the_restored_detail():
    g = _trained_like_generator()
    x = torch.rand(1, 3, 128, 96)
    out = restore_resize(g, x)
    assert out.shape == x.shape
    assert 0 <= out.min() and out.max() <= 1
    # downsampled back to 64 the output carries the generator's correction
    small = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True)
    out_small = torch.nn.functional.interpolate(out, size=(64, 64), mode="bilinear", antialias=True)
    change = (out_small - small).abs().mean()
    wanted = (restore(g, small) - small).abs().mean()
    assert change > 0.3 * wanted


@pytest.mark.parametrize("mode", ["resize", "tiles"])
def test_cli_writes_one_png_per_input_and_reports_bad_files(tmp_path, weights, mode, capsys):
    src = tmp_path / "in"
    src.mkdir()
    good = [_photo(src / "a.jpg", (90, 70)), _photo(src / "b.png", (64, 64), seed=1)]
    bad = src / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    missing = src / "missing.png"
    out = tmp_path / "out"

    code = main(
        [
            "--weights",
            str(weights),
            "--out",
            str(out),
            "--mode",
            mode,
            str(good[0]),
            str(bad),
            str(missing),
            str(good[1]),
        ]
    )

    assert code == 1
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "missing.png" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    for path in good:
        with Image.open(path) as i, Image.open(out / f"{path.stem}.png") as o:
            assert o.format == "PNG" and o.size == i.size and o.mode == "RGB"
            assert not np.array_equal(np.asarray(o), np.asarray(i.convert("RGB")))


def test_cli_succeeds_with_zero_exit_and_other_formats(tmp_path, weights):
    img = _photo(tmp_path / "face.webp", (50, 60))
    code = main(["--weights", str(weights), "--out", str(tmp_path / "o"), "--format", "jpg", str(img)])
    assert code == 0
    with Image.open(tmp_path / "o" / "face.jpg") as o:
        assert o.format == "JPEG" and o.size == (50, 60)


def test_cli_refuses_to_overwrite_an_input(tmp_path, weights, capsys):
    img = _photo(tmp_path / "face.png")
    before = img.read_bytes()
    assert main(["--weights", str(weights), "--out", str(tmp_path), str(img)]) == 2
    assert "would overwrite input" in capsys.readouterr().err
    assert img.read_bytes() == before


def test_cli_refuses_two_inputs_with_one_output_name(tmp_path, weights, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a, b = _photo(tmp_path / "x" / "face.jpg"), _photo(tmp_path / "y" / "face.png")
    assert main(["--weights", str(weights), "--out", str(tmp_path / "o"), str(a), str(b)]) == 2
    assert "both be written" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_names_a_bad_weights_file(tmp_path, capsys):
    img = _photo(tmp_path / "face.png")
    bad = tmp_path / "generator.safetensors"
    bad.write_bytes(b"nope")
    assert main(["--weights", str(bad), "--out", str(tmp_path / "o"), str(img)]) == 2
    assert "generator.safetensors" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the CLI as a user runs it

INFER = "deblur.infer"


def test_an_existing_output_is_refused_before_any_work_unless_overwrite(tmp_path, weights):
    """The output name exists (a file this run did not write): nothing is read or written."""
    inputs = [_photo(tmp_path / "in" / name, seed=i) for i, name in enumerate(("a.jpg", "face.jpg"))]
    out = tmp_path / "out"
    out.mkdir()
    (out / "face.png").write_bytes(b"someone else's picture")
    before = files(tmp_path)
    line = error_line(run_cli(INFER, "--weights", weights, "--out", out, *inputs), 2)
    assert line == (
        f"error: output {out / 'face.png'} already exists (not written by this run); "
        "choose another --out or pass --overwrite"
    )
    assert files(tmp_path) == before  # not even a.png: the refusal comes before any work

    result = run_cli(INFER, "--weights", weights, "--out", out, "--overwrite", *inputs)
    assert result.returncode == 0, result.stderr
    with Image.open(out / "face.png") as replaced:
        assert replaced.format == "PNG" and replaced.size == (90, 70)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "face.png"]  # no temporary file left
    assert all(p.read_bytes() == before[p] for p in inputs)


@pytest.mark.parametrize(
    "option, expected",
    [
        (["--batch-size", "0"], "error: --batch-size: must be at least 1, got 0"),
        (
            ["--batch-size", "x"],
            "error: python -m deblur.infer: argument --batch-size: invalid int value: 'x' (see --help)",
        ),
        (["--device", "banana"], "error: --device: 'banana' is not a torch device (e.g. cpu, cuda, cuda:1)"),
        (["--device", "cuda:7"], "error: --device: 'cuda:7' is not available on this machine"),
    ],
)
def test_bad_options_are_one_line_naming_the_option(tmp_path, weights, option, expected):
    img = _photo(tmp_path / "face.jpg")
    before = files(tmp_path)
    line = error_line(run_cli(INFER, "--weights", weights, "--out", tmp_path / "out", *option, img), 2)
    assert line.startswith(expected), line
    assert files(tmp_path) == before and not (tmp_path / "out").exists()


def test_out_that_is_a_file_and_weights_that_are_not_the_generators(tmp_path, weights):
    img = _photo(tmp_path / "face.jpg")
    out = tmp_path / "restored"
    out.write_text("a file, not a folder")
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    state = Generator().state_dict()
    state["dec1.0.bias"][3] = float("nan")
    nan = tmp_path / "nan.safetensors"
    save_file(state, str(nan), metadata={"residual": "true", "image_size": "64"})
    before = files(tmp_path)

    line = error_line(run_cli(INFER, "--weights", weights, "--out", out, img), 2)
    assert line == f"error: --out {out}: is a file, not a folder"
    line = error_line(run_cli(INFER, "--weights", other, "--out", tmp_path / "o", img), 2)
    assert line.startswith(f"error: {other}: not a deblur Generator's weights: missing tensor 'enc1.0.weight'")
    line = error_line(run_cli(INFER, "--weights", nan, "--out", tmp_path / "o", img), 2)
    assert line.startswith(f"error: {nan}: tensor 'dec1.0.bias' holds 1 NaN/inf values")
    assert files(tmp_path) == before and not (tmp_path / "o").exists()


def test_disk_full_removes_the_partial_output_and_keeps_the_finished_ones(tmp_path, weights):
    """A real ENOSPC: --out is a 64 KiB tmpfs; the small image fits, the large noisy one does not."""
    small = _photo(tmp_path / "in" / "a.png", (64, 64))
    large = _photo(tmp_path / "in" / "b.png", (300, 300), seed=1)  # ~270 KB of PNG noise
    before = files(tmp_path)
    result, names = in_small_filesystem(
        tmp_path / "out", "64k", command(INFER, "--weights", weights, "--out", tmp_path / "out", small, large)
    )
    line = error_line(result, 1, alone=False)
    assert line.startswith(f"error: disk full while writing {tmp_path / 'out' / 'b.png'}: ") and "MiB free on" in line
    assert names == ["a.png"]  # finished output kept, no partial b.png
    assert files(tmp_path) == before


def test_an_out_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, weights):
    img = _photo(tmp_path / "face.jpg")
    result, names = in_small_filesystem(
        tmp_path / "ro", "64k", command(INFER, "--weights", weights, "--out", tmp_path / "ro", img), read_only=True
    )
    line = error_line(result, 2)
    assert line == f"error: --out {tmp_path / 'ro'}: cannot write there (Read-only file system)"
    assert names == []
