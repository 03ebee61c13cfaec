"""How many long-form edits one MEMIT+AnyEdit write holds at layer 12 of SmolLM2 (dev records only).

The δ targets of UnKEBench dev records 0..N-1 are optimised on the unedited model (the preset's MEMIT
configuration, no write); then MEMIT's closed form (docs/algorithm.md §4.3) is solved jointly for the
first n of them, for several n and λ, and each request's share of its residual ‖Z − H‖ left at its keys
is measured (layer 12 is also the z-layer, so the layer output at a key moves by exactly ΔW k). That is
what the batch write, and the ledger's joint re-solve of n kept edits, can reach; one edit reaches its
targets in generation only when this share is small. Also printed: ‖ΔW K_p‖ / ‖W K_p‖ (the edited
texts elsewhere) and √tr(ΔW C ΔWᵀ) / √tr(W C Wᵀ) (generic text). Run as:
    OMP_NUM_THREADS=2 python docs/results/retention/memit_capacity.py 20 > capacity.jsonl
"""

import json
import sys

import torch

from anyedit_lightning import load_model
from anyedit_lightning.api import default_trainer
from anyedit_lightning.benchmarks import UnKEBenchDataModule
from anyedit_lightning.core.hooks import record_inputs, record_outputs
from anyedit_lightning.core.module import AnyEditModule
from anyedit_lightning.evaluation.config import BenchConfig
from anyedit_lightning.evaluation.runner import stats_for
from anyedit_lightning.presets import get_preset

count = int(sys.argv[1])
data = UnKEBenchDataModule(start=0, limit=count, split="dev")
data.setup("predict")
model, tok = load_model()
preset = get_preset("smollm2-135m-instruct")
config = preset.config("memit", True)
(layer,) = config.layers
stats = stats_for(model, tok, [BenchConfig(method="memit", dataset="unkebench")])
C = stats[layer].double()
module = AnyEditModule(model, tok, data.requests, config)
default_trainer(model, [], enable_progress_bar=False, logger=False).fit(module)  # δs only, no write
handle = module.handle
W = handle.weight_as_out_in(layer).detach().double()
per = []
for plan in module.plans:
    with torch.no_grad(), record_inputs({"k": handle.down_proj(layer)}) as ins:
        with record_outputs({"h": handle.layer(layer)}) as outs:
            model(input_ids=torch.tensor([plan.tokenized.ids]), use_cache=False)
    k, h = ins.values["k"][0].double(), outs.values["h"][0].double()
    is_key = torch.zeros(len(k), dtype=torch.bool)
    is_key[plan.keys] = True
    per.append((k[is_key], k[~is_key], plan.targets.double() - h[is_key]))
for lam in (100.0, 10.0, 1.0):
    for n in sorted({1, 2, 5, 10, count} & set(range(1, count + 1))):
        K = torch.cat([p[0] for p in per[:n]])
        K_p = torch.cat([p[1] for p in per[:n]])
        R = torch.cat([p[2] for p in per[:n]])
        dW = torch.linalg.solve(lam * C + K.T @ K + K_p.T @ K_p, K.T @ R).T
        left = [float((dW @ k.T - r.T).norm() / r.norm()) for k, _, r in per[:n]]
        row = dict(
            lam=lam,
            n=n,
            keys=len(K),
            preserved=len(K_p),
            left_mean=sum(left) / n,
            left_max=max(left),
            preserved_change=float((dW @ K_p.T).norm() / (W @ K_p.T).norm()),
            generic_change=float((torch.trace(dW @ C @ dW.T) / torch.trace(W @ C @ W.T)).sqrt()),
        )
        print(json.dumps(row), flush=True)
