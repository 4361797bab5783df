"""Int8 row-wise storage of weight matrices (seqssm.models.int8) and S4 chemical LM files that use it."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from seqssm.errors import InputError
from seqssm.models.int8 import (MIN_NUMEL, QUANTIZATION, SCALE_SUFFIX, dequantize_rowwise, dequantize_state,
                                quantize_rowwise, quantize_state)
from seqssm.models.s4_chem import S4ChemConfig, S4ChemLM


def test_rowwise_rounding_error_is_at_most_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 300, generator=g) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different size
    w[5] = 0.0
    q, scale = quantize_rowwise(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (64,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    # each row's largest element lands on +-127: the scale is that row's own
    assert torch.equal(q.abs().amax(dim=1)[torch.arange(64) != 5], torch.full((63,), 127, dtype=torch.int8))
    back = dequantize_rowwise(q, scale)
    assert torch.equal(back[5], torch.zeros(300))
    err = (back - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all())
    # and it is real rounding, not a lossless copy
    assert float(err.max()) > 0
    with pytest.raises(ValueError, match="floating-point matrix"):
        quantize_rowwise(torch.randn(3, 4, 5))


def test_state_round_trip_rounds_big_weight_matrices_only():
    g = torch.Generator().manual_seed(1)
    state = {
        "fc.weight": torch.randn(128, 64, generator=g),          # 8,192 elements: rounded
        "fc.bias": torch.randn(128, generator=g),                # vector: kept
        "small.weight": torch.randn(16, 16, generator=g),        # under MIN_NUMEL: kept
        "kernel.C": torch.randn(64, 32, 2, generator=g),         # S4 parameters: kept
        "table": torch.randn(128, 64, generator=g),              # not a .weight: kept
        "steps": torch.tensor([3]),                              # integers: kept
    }
    assert state["fc.weight"].numel() >= MIN_NUMEL > state["small.weight"].numel()
    stored = quantize_state(state)
    assert set(stored) == set(state) | {"fc.weight" + SCALE_SUFFIX}
    assert stored["fc.weight"].dtype == torch.int8
    for k in state:
        if k != "fc.weight":
            assert stored[k] is state[k]
    back = dequantize_state(stored)
    assert set(back) == set(state)
    q, s = quantize_rowwise(state["fc.weight"])
    assert torch.equal(back["fc.weight"], dequantize_rowwise(q, s))
    torch.testing.assert_close(back["fc.weight"], state["fc.weight"], rtol=0, atol=float(s.max()) / 2 * 1.001)
    # a state without int8 tensors passes through unchanged
    assert dequantize_state(state) == state
    with pytest.raises(ValueError, match="reserved"):
        quantize_state({"x" + SCALE_SUFFIX: torch.zeros(3)})


def test_broken_int8_states_are_errors():
    q, s = quantize_rowwise(torch.randn(4, 8))
    with pytest.raises(ValueError, match="without its scales"):
        dequantize_state({"a.weight": q})
    with pytest.raises(ValueError, match="without the tensor"):
        dequantize_state({"a.weight" + SCALE_SUFFIX: s})
    with pytest.raises(ValueError, match="one scale per row"):
        dequantize_state({"a.weight": q, "a.weight" + SCALE_SUFFIX: s[:3]})


def _model(seed: int = 0) -> S4ChemLM:
    """Wide enough (23 x 192 >= MIN_NUMEL) that the embedding and the LM head are rounded too."""
    torch.manual_seed(seed)
    return S4ChemLM(S4ChemConfig(vocab_size=23, d_model=192, n_blocks=2, d_state=16, max_len=40, dropout=0.0)).eval()


def test_int8_model_files_load_the_rounded_weights(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "f32")
    model.save_pretrained(tmp_path / "q", int8=True)
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert f.metadata()["quantization"] == QUANTIZATION
    raw = load_file(tmp_path / "q" / "model.safetensors")
    rounded = sorted(k for k, v in raw.items() if v.dtype == torch.int8)
    # every linear layer (the S4 output projections, feed-forward) and the embedding / LM head
    assert "embedding.weight" in rounded and "lm_head.weight" in rounded and "blocks.1.ff.fc2.weight" in rounded
    assert "blocks.0.s4_1.output_linear.weight" in rounded and not any(".C" in k or "log_dt" in k for k in rounded)
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("f32", "q")}
    assert size["q"] < 0.4 * size["f32"]

    loaded = S4ChemLM.from_pretrained(tmp_path / "q")
    expected = dequantize_state(quantize_state(model.state_dict()))
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for k in got:
        assert got[k].dtype == model.state_dict()[k].dtype and torch.equal(got[k], expected[k].to(got[k].dtype)), k
    # the rounding moves the next-token distribution a little, not a lot
    g = torch.Generator().manual_seed(3)
    x = torch.randint(3, 23, (4, 40), generator=g)
    x[:, 0] = model.cfg.bos_id
    with torch.no_grad():
        p, pq = torch.softmax(model(x), -1), torch.softmax(loaded(x), -1)
    assert 0 < float((p - pq).abs().max()) < 0.05


def test_broken_int8_file_names_the_file(tmp_path):
    _model().save_pretrained(tmp_path / "q", int8=True)
    weights = tmp_path / "q" / "model.safetensors"
    raw = load_file(weights)
    del raw["lm_head.weight" + SCALE_SUFFIX]
    save_file(raw, str(weights))
    with pytest.raises(InputError) as e:
        S4ChemLM.from_pretrained(tmp_path / "q")
    assert str(weights) in str(e.value) and "lm_head.weight" in str(e.value)
