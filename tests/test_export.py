"""ONNX export: ONNX Runtime reproduces the PyTorch generator, at more than one batch size."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch

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

    main(["--weights", str(weights), "--onnx", str(out)])

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
