"""evals.make_checkpoint on the CPU."""

import json

from evals import make_checkpoint


def test_make_checkpoint_synthetic(tmp_path):
    assert make_checkpoint.main(["synthetic", str(tmp_path / "m"), "--layers", "1"]) == 0
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "pack-quantized"
