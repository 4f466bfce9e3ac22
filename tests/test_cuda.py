"""GPU path: one training run on CUDA with bf16 autocast (skipped on machines without a GPU)."""

import pytest
import torch

from helpers import tiny_model
from loopsearch.data import PreparedData
from loopsearch.spec import TrainConfig
from loopsearch.train import train, use_bf16

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
def test_train_on_cuda_with_bf16():
    ids = torch.randint(0, 40, (5000,))
    data = PreparedData(ids, ids[:1000].clone(), "", 40, "random")
    model = tiny_model(vocab=40, seq_len=32, loop=(1, 3, {"n_loops": 2}))
    cfg = TrainConfig(batch_size=8, seq_len=32, device="cuda", min_steps=1, eval_sequences=8)
    assert use_bf16(cfg.precision, torch.device("cuda")) == torch.cuda.is_bf16_supported()
    r = train(model, data, cfg, 5e8, seed=0, progress=False)
    assert r.train_flops <= 5e8 and next(model.parameters()).device.type == "cuda"


def test_auto_precision_is_fp32_on_cpu():
    assert use_bf16("auto", torch.device("cpu")) is False
    assert use_bf16("bf16", torch.device("cpu")) is True
