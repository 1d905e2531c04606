"""Quantization configs of other compressed-tensors schemes (not W4AFP8):
what this package must leave to vLLM (tests/plugin/)."""

W8A8_FP8 = {
    "quant_method": "compressed-tensors", "format": "float-quantized",
    "config_groups": {"group_0": {"targets": ["Linear"],
                                  "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                              "symmetric": True, "dynamic": False},
                                  "input_activations": {"num_bits": 8, "type": "float",
                                                        "strategy": "token", "symmetric": True,
                                                        "dynamic": True}}},
}
W4A16 = {
    "quant_method": "compressed-tensors", "format": "pack-quantized",
    "config_groups": {"group_0": {"targets": ["Linear"],
                                  "weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                              "group_size": 128, "symmetric": True,
                                              "dynamic": False},
                                  "input_activations": None}},
}
