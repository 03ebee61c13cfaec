"""The script that produced dev_retain.json (written before the `retention` command existed; kept as
the record of that run). Run as: OMP_NUM_THREADS=2 python dev_script.py '{"retain": true}' 5 out.json
(stopped by hand after 3 edits, for time; 2 CPU threads, the test suite ran beside edits 1-3)."""
import json, sys, time, torch
from anyedit_lightning import edit_sequentially, load_model
from anyedit_lightning.benchmarks import UnKEBenchDataModule
from anyedit_lightning.core.requests import prompt_text
from anyedit_lightning.evaluation import generate_batch
from anyedit_lightning.evaluation.faithfulness import FaithfulnessProbe, FaithfulnessOptions
from anyedit_lightning.metrics import rouge_l_recall
wk = json.loads(sys.argv[1]); n = int(sys.argv[2]); out = sys.argv[3]
data = UnKEBenchDataModule(start=0, limit=n, split="dev"); data.setup("predict"); reqs = data.requests
model, tok = load_model()
probe = FaithfulnessProbe(model, tok, "unkebench", FaithfulnessOptions(locality_prompts=24, cross_questions=12, neighbours=0, fluency_prompts=0, perplexity_tokens=2048)).prepare()
t0 = time.perf_counter(); last = [t0]; rows = []
def measure(i, module):
    secs = time.perf_counter() - last[0]
    done = i + 1
    prompts = [prompt_text(tok, r) for r in reqs[:done]]
    longest = max(len(tok(r.target)["input_ids"]) for r in reqs[:done])
    ans = generate_batch(model, tok, prompts, max_new_tokens=longest + 30, batch_size=10)
    sc = [rouge_l_recall(a.text, r.target) for a, r in zip(ans, reqs)]
    f = probe.measure_edit()
    row = dict(edits=done, edit_seconds=secs, rouge=sc, mean=sum(sc)/done, stopped=sum(a.stopped for a in ans)/done,
               loc=f["locality_agreement"], cross=f.get("cross_agreement"), ppl=f.get("perplexity_ratio"))
    rows.append(row); print(json.dumps(row), flush=True)
    open(out, "w").write(json.dumps(rows))
    last[0] = time.perf_counter()
edit_sequentially(model, tok, reqs, callback=measure, writer_kwargs=wk,
                  trainer_kwargs=dict(enable_progress_bar=False, logger=False))
