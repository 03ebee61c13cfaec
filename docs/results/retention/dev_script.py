"""The script that produced dev_retain.json (written before the `retention` command existed; kept as
the record of that run). Run as: OMP_NUM_THREADS=2 python dev_script.py '{"retain": true}' 5 out.json
(stopped by hand after 3 edits, for time; 2 CPU threads, the test suite ran beside edits 1-3)."""

import json
import sys
import time

from anyedit_lightning import edit_sequentially, load_model
from anyedit_lightning.benchmarks import UnKEBenchDataModule
from anyedit_lightning.core.requests import prompt_text
from anyedit_lightning.evaluation import generate_batch
from anyedit_lightning.evaluation.faithfulness import FaithfulnessOptions, FaithfulnessProbe
from anyedit_lightning.metrics import rouge_l_recall

writer_kwargs = json.loads(sys.argv[1])
count = int(sys.argv[2])
out = sys.argv[3]
data = UnKEBenchDataModule(start=0, limit=count, split="dev")
data.setup("predict")
requests = data.requests
model, tok = load_model()
options = FaithfulnessOptions(
    locality_prompts=24, cross_questions=12, neighbours=0, fluency_prompts=0, perplexity_tokens=2048
)
probe = FaithfulnessProbe(model, tok, "unkebench", options).prepare()
last = [time.perf_counter()]
rows = []


def measure(i, module):
    seconds = time.perf_counter() - last[0]
    done = i + 1
    prompts = [prompt_text(tok, r) for r in requests[:done]]
    longest = max(len(tok(r.target)["input_ids"]) for r in requests[:done])
    answers = generate_batch(model, tok, prompts, max_new_tokens=longest + 30, batch_size=10)
    scores = [rouge_l_recall(a.text, r.target) for a, r in zip(answers, requests)]
    f = probe.measure_edit()
    row = dict(
        edits=done,
        edit_seconds=seconds,
        rouge=scores,
        mean=sum(scores) / done,
        stopped=sum(a.stopped for a in answers) / done,
        loc=f["locality_agreement"],
        cross=f.get("cross_agreement"),
        ppl=f.get("perplexity_ratio"),
    )
    rows.append(row)
    print(json.dumps(row), flush=True)
    with open(out, "w") as file:
        file.write(json.dumps(rows))
    last[0] = time.perf_counter()


edit_sequentially(
    model,
    tok,
    requests,
    callback=measure,
    writer_kwargs=writer_kwargs,
    trainer_kwargs=dict(enable_progress_bar=False, logger=False),
)
