"""The faithful-edits search (docs/faithful.md): efficacy vs locality per configuration, dev records only.

Each trial edits one dev record into the embedded SmolLM2 with ``edit(...)`` and the trial's overrides,
then scores, against the unedited model:
- ``rougeL``: ROUGE-L recall of the regenerated answer to the edited prompt (efficacy);
- ``para``: the same for the paraphrase;
- ``agree`` / ``kl``: teacher-forced top-1 agreement with, and KL to, the unedited model's own greedy
  answers to a *search-only* set of unrelated prompts (below; the library's locality sets are not used
  here, so the acceptance figures are not tuned on them);
- ``ppl``: perplexity ratio after/before on the last article of the Wikipedia sample;
and restores the weights bit-exactly. Rows append to a JSONL file, one per (trial, record).

    OMP_NUM_THREADS=2 python benchmarks/faithful_search.py --records 0 2 3 \\
        --trial '{"name": "preset"}' --trial '{"name": "clamp1", "edit": {"clamp": 1.0}}' --out search.jsonl
    python benchmarks/faithful_search.py --out search.jsonl --plot pareto.png --chosen NAME
    python benchmarks/faithful_search.py --out search.jsonl --table

A trial is JSON: ``edit`` (EditConfig overrides), ``writer`` (writer kwargs), ``method``, ``corpus``
(``"wikipedia"``, ``"wikichat"``: the statistics articles as chat turns, ``"chat"``: UnKEBench records
50-999 as chat turns, or ``"mix"``: chat and wikipedia); for UnKE the corpus gives ``preservation``
texts instead of statistics.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from anyedit_lightning import edit, load_model
from anyedit_lightning.benchmarks import get_datamodule
from anyedit_lightning.core.requests import EditRequest, prompt_text
from anyedit_lightning.evaluation.generation import generate_batch, stop_token_ids
from anyedit_lightning.metrics import rouge_l_recall
from anyedit_lightning.stats.corpus import resolve_corpus, wikipedia_chat

SEARCH_PROMPTS = [
    "What is the tallest mountain in the world?",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 17 times 3?",
    "Write a haiku about autumn leaves.",
    "What does a thermometer measure?",
    "Give me two tips for sleeping better.",
    "Who wrote Romeo and Juliet?",
    "Write a Python function that reverses a string.",
    "What is photosynthesis?",
    "Name three primary colours.",
    "How do I boil an egg?",
    "What is the chemical symbol for gold?",
    "Explain what a noun is.",
    "Quelle est la capitale de l'Italie ?",
    "What is the boiling point of water in Celsius?",
    "Why is the sky blue?",
    "List the days of the week.",
    "What is a prime number?",
    "Describe a cat in one sentence.",
    "What causes rain?",
    "How many minutes are in two hours?",
    "What is the largest ocean on Earth?",
    "Suggest a name for a pet goldfish.",
]


def chat_texts(tokenizer, start: int = 50, stop: int = 1000) -> list[str]:
    """UnKEBench records outside the dev and test splits, rendered as one user/assistant exchange each."""
    records = json.loads(Path("data/UnKE/final_data_v2.json").read_text())[start:stop]
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}],
            tokenize=False,
        )
        for r in records
    ]


def heldout_text() -> str:
    _, texts = resolve_corpus("wikipedia-sample")
    return list(texts)[-1][:20000]


class Reference:
    """The unedited model's answers, next-token log-probs and held-out NLL."""

    def __init__(self, model, tokenizer, prompts, text, max_new_tokens=32):
        self.model, self.tokenizer = model, tokenizer
        stops = stop_token_ids(tokenizer)
        self.rows = []
        for p in prompts:
            ids = tokenizer(prompt_text(tokenizer, EditRequest(p, "-")), add_special_tokens=False)[
                "input_ids"
            ]
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=stops,
                    pad_token_id=stops[0],
                )
            self.rows.append((ids, out[0, len(ids) :].tolist()))
        self.text_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :1024]
        self.logp = self._logprobs()
        self.nll = self._nll()

    @torch.no_grad()
    def _logprobs(self):
        out = []
        for ids, ans in self.rows:
            x = torch.tensor([ids + ans])
            logits = self.model(input_ids=x).logits[0, len(ids) - 1 : len(ids) + len(ans) - 1]
            out.append(torch.log_softmax(logits.float(), -1))
        return out

    @torch.no_grad()
    def _nll(self):
        logits = self.model(input_ids=self.text_ids).logits[0, :-1].float()
        return torch.nn.functional.cross_entropy(logits, self.text_ids[0, 1:]).item()

    def score(self):
        """Agreement and KL over all answer positions, agreement at the first answer position, ppl ratio."""
        agree, total, kl, first = 0, 0, 0.0, 0
        for (ids, ans), ref in zip(self.rows, self.logp):
            x = torch.tensor([ids + ans])
            with torch.no_grad():
                logits = self.model(input_ids=x).logits[0, len(ids) - 1 : len(ids) + len(ans) - 1]
            lp = torch.log_softmax(logits.float(), -1)
            same = lp.argmax(-1) == torch.tensor(ans)
            agree += int(same.sum())
            first += int(same[0])
            total += len(ans)
            kl += float((ref.exp() * (ref - lp)).sum())
        ppl = float(torch.tensor(self._nll() - self.nll).exp())
        return agree / total, kl / total, first / len(self.rows), ppl


def answer(model, tokenizer, question, max_new_tokens):
    return generate_batch(
        model, tokenizer, [prompt_text(tokenizer, EditRequest(question, "-"))], max_new_tokens
    )[0]


def _trials(rows_path: str) -> dict[str, list[dict]]:
    trials: dict[str, list[dict]] = {}
    for line in Path(rows_path).read_text().splitlines():
        row = json.loads(line)
        trials.setdefault(row["trial"], []).append(row)
    return trials


def markdown_table(rows_path: str) -> str:
    """One line per trial: means over its records (the table in docs/faithful.md)."""
    keys = ("rougeL", "para", "agree", "agree0", "kl", "ppl", "seconds")
    lines = [
        "| # | trial | method | records | ROUGE-L | para | agreement | first-token agr. | KL | ppl × | s/edit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for number, (name, rows) in enumerate(_trials(rows_path).items(), 1):
        mean = {k: sum(r[k] or 0.0 for r in rows) / len(rows) for k in keys}
        records = ",".join(str(r["record"]) for r in rows)
        method = rows[0]["spec"].get("method", "memit")
        cells = [f"{mean[k]:.3f}" for k in keys[:-1]] + [f"{mean['seconds']:.0f}"]
        lines.append(f"| {number} | {name} | {method} | {records} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto_plot(rows_path: str, out: str, chosen_names: list[str]) -> None:
    """Mean efficacy vs mean locality agreement per trial (one point each, by method), chosen points ringed."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    trials = _trials(rows_path)
    colours = {"memit": "tab:blue", "alphaedit": "tab:green", "unke": "tab:red"}
    fig, ax = plt.subplots(figsize=(8, 6))
    for number, (name, rows) in enumerate(trials.items(), 1):
        method = rows[0]["spec"].get("method", "memit")
        x = sum(r["agree"] for r in rows) / len(rows)
        y = sum(r["rougeL"] for r in rows) / len(rows)
        chosen = name in chosen_names
        ax.scatter(
            x, y, c=colours.get(method, "k"), s=90 if chosen else 30, edgecolors="k" if chosen else None
        )
        ax.annotate(str(number), (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    for method, colour in colours.items():
        ax.scatter([], [], c=colour, label=method)
    ax.axvline(0.95, ls=":", c="grey")
    ax.axhline(0.95, ls=":", c="grey")
    ax.set_xlabel("locality agreement (search prompts, mean over dev records)")
    ax.set_ylabel("efficacy ROUGE-L recall (mean over dev records)")
    ax.set_title("Faithful-edits search on SmolLM2-135M (dev records; numbers: table rows; large: chosen)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, nargs="+", default=[0])
    parser.add_argument("--dataset", default="unkebench")
    parser.add_argument("--trial", action="append")
    parser.add_argument("--out", default="search.jsonl")
    parser.add_argument("--plot", metavar="PNG", help="only draw the Pareto plot of --out's rows into PNG")
    parser.add_argument("--chosen", nargs="*", default=[], help="trial names drawn as chosen points")
    parser.add_argument("--table", action="store_true", help="only print --out's trials as a markdown table")
    args = parser.parse_args()
    if args.table:
        return print(markdown_table(args.out))
    if args.plot:
        return pareto_plot(args.out, args.plot, args.chosen)
    if not args.trial:
        parser.error("give at least one --trial (or --plot)")
    torch.manual_seed(0)
    model, tokenizer = load_model()
    data = get_datamodule(args.dataset, start=0, limit=20, split="dev")
    requests = {r.extra["index"]: r for r in data.requests}
    ref = Reference(model, tokenizer, SEARCH_PROMPTS, heldout_text())
    corpora = {}
    for spec in args.trial:
        trial = json.loads(spec)
        corpus = trial.get("corpus", "wikipedia")
        writer = dict(trial.get("writer", {}))
        if corpus == "wikichat":  # the statistics articles as chat turns (corpus.wikipedia_chat)
            if trial.get("method") == "unke":
                texts = wikipedia_chat(tokenizer)
                count = trial.get("preservation", 20)
                writer["preservation_texts"] = texts[:: max(1, len(texts) // count)][:count]
            else:
                writer["corpus"] = "wikipedia-chat"
        elif corpus != "wikipedia":
            if corpus not in corpora:
                chat = chat_texts(tokenizer)
                corpora[corpus] = (
                    chat
                    if corpus == "chat"
                    else [t for pair in zip(chat, list(resolve_corpus("wikipedia-sample")[1])) for t in pair]
                )
            if trial.get("method") == "unke":  # UnKE preserves its layer's outputs on texts, not on C
                writer["preservation_texts"] = corpora[corpus][: trial.get("preservation", 20)]
            else:
                writer["corpus"] = corpora[corpus]
        for index in args.records:
            request = requests[index]
            t0 = time.perf_counter()
            module = edit(
                model,
                tokenizer,
                request,
                method=trial.get("method", "memit"),
                writer_kwargs=writer,
                trainer_kwargs={"enable_progress_bar": False},
                **trial.get("edit", {}),
            )
            seconds = time.perf_counter() - t0
            n = len(tokenizer(request.target)["input_ids"]) + 16
            gen = answer(model, tokenizer, request.prompt, n)
            para = (
                answer(model, tokenizer, request.extra["para_prompt"], n)
                if request.extra.get("para_prompt")
                else None
            )
            agree, kl, agree0, ppl = ref.score()
            france = answer(model, tokenizer, "What is the capital of France?", 24).text
            row = {
                "trial": trial.get("name"),
                "spec": trial,
                "record": index,
                "seconds": round(seconds, 1),
                "rougeL": round(rouge_l_recall(gen.text, request.target), 3),
                "para": round(rouge_l_recall(para.text, request.target), 3) if para else None,
                "stopped": gen.stopped if hasattr(gen, "stopped") else None,
                "agree": round(agree, 4),
                "agree0": round(agree0, 3),
                "kl": round(kl, 4),
                "ppl": round(ppl, 4),
                "delta_norm": round(
                    sum(m["delta_norm"] / m["h_norm"] for m in module.chunk_metrics)
                    / len(module.chunk_metrics),
                    3,
                ),
                "chunks": len(module.chunk_metrics),
                "france": france,
            }
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            with torch.no_grad():
                params = dict(model.named_parameters())
                for name, value in module.edit_record.before.items():
                    params[name].copy_(value)


if __name__ == "__main__":
    main()
