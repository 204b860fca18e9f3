"""ONNX export: ONNX Runtime reproduces the PyTorch generator, at more than one batch size."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from cli_checks import command, error_line, files, in_small_filesystem, run_cli

from deblur.export import main
from deblur.models import Generator
from deblur.weights import save_generator


def test_onnx_runtime_reproduces_pytorch(tmp_path):
    torch.manual_seed(0)
    generator = Generator(residual=True)
    # the residual init makes the last layer zero (output == input): give it real weights so the
    # comparison exercises the whole network
    torch.nn.init.normal_(generator.dec6.weight, std=0.02)
    weights = save_generator(generator, tmp_path / "generator.safetensors")
    out = tmp_path / "generator.onnx"

    assert main(["--weights", str(weights), "--onnx", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generator.onnx", "generator.safetensors"]  # no partial

    onnx.checker.check_model(str(out))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    generator.eval()
    for batch in (1, 3):  # the batch axis is dynamic
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            expected = generator(x).numpy()
        (got,) = session.run(None, {"input": x.numpy()})
        assert got.shape == (batch, 3, 64, 64)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
        assert not np.allclose(got, x.numpy(), atol=1e-3)  # not the identity


EXPORT = "deblur.export"


@pytest.fixture
def weights(tmp_path):
    return save_generator(Generator(residual=True), tmp_path / "w" / "generator.safetensors")


def test_an_unwritable_onnx_path_is_refused_before_the_export_runs(tmp_path, weights):
    target = tmp_path / "ro" / "generator.onnx"
    result, names = in_small_filesystem(
        tmp_path / "ro", "64k", command(EXPORT, "--weights", weights, "--onnx", target), read_only=True
    )
    assert error_line(result, 2) == f"error: --onnx {target}: cannot write there (Read-only file system)"
    assert "torch.onnx" not in result.stdout and names == []  # the exporter never started


def test_an_existing_file_a_folder_and_a_path_under_a_file_are_refused(tmp_path, weights):
    existing = tmp_path / "old.onnx"
    existing.write_bytes(b"an earlier export")
    (tmp_path / "a_file").write_text("not a folder")
    before = files(tmp_path)
    line = error_line(run_cli(EXPORT, "--weights", weights, "--onnx", existing), 2)
    assert line == f"error: --onnx {existing}: exists already; choose another path or pass --overwrite"
    assert (
        error_line(run_cli(EXPORT, "--weights", weights, "--onnx", tmp_path), 2)
        == f"error: --onnx {tmp_path}: is a folder"
    )
    under_a_file = tmp_path / "a_file" / "g.onnx"
    line = error_line(run_cli(EXPORT, "--weights", weights, "--onnx", under_a_file), 2)
    assert line.startswith(f"error: --onnx {under_a_file}: cannot write there (")
    assert files(tmp_path) == before
