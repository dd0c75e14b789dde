"""Run by test_train.py, alone or under `accelerate launch --num_processes 2 --cpu`: trains a tiny model
end to end and writes the loss curve (main process) to argv[1]."""

import copy
import json
import sys

import torch
from conftest import tiny_model, token_batch

from factorllm import FactorConfig, convert_
from factorllm.train import TrainConfig, TrainData, train

torch.manual_seed(0)
dense = tiny_model("llama")
student = convert_(copy.deepcopy(dense), FactorConfig(4, 2, gating="softmax_renorm"), progress=False)
cfg = TrainConfig(mode="end2end", train_experts=True, distill_weight=1.0, pa_weight=0.1, max_steps=6, batch_size=4,
                  lr=1e-2, save_every=0)
result = train(student, dense, TrainData(token_batch(8, 16, seed=0)), cfg, progress=False)
from accelerate import PartialState  # noqa: E402

state = PartialState()
if state.is_main_process:
    with open(sys.argv[1], "w") as f:
        json.dump({"processes": state.num_processes, "losses": [r["loss"] for r in result.history]}, f)
