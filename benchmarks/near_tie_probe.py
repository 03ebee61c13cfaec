"""What the demo's edit does to an unrelated answer whose first token is a near tie (docs/faithful.md, step 10).

The unedited SmolLM2 answers "What is the capital of France?" with "The" only 0.08 logits ahead of "L"
(whose continuation is "L'Étoile, la Marseillaise, la femme, …"), so any edit that moves those logits by
more than that flips the answer. This edits the demo's request (``anyedit_lightning.demo``) into the
unedited model with the given overrides and prints, per probe prompt, the first answer token's lead over
the runner-up before and after, and the answers; the edited prompt's and the paraphrase's ROUGE-L.

    OMP_NUM_THREADS=2 python benchmarks/near_tie_probe.py
    OMP_NUM_THREADS=2 python benchmarks/near_tie_probe.py --edit '{"clamp": 1.0}' --writer '{"preservation_weight": 8}'
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from anyedit_lightning import EditRequest, edit, load_model
from anyedit_lightning.demo import PARAPHRASE, PROMPT, TARGET, answer, unrelated_panel
from anyedit_lightning.metrics import rouge_l_recall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edit", type=json.loads, default={}, help="EditConfig overrides (JSON)")
    parser.add_argument("--writer", type=json.loads, default={}, help="writer keyword overrides (JSON)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_model()
    before = unrelated_panel(model, tokenizer)
    started = time.perf_counter()
    edit(
        model,
        tokenizer,
        EditRequest(PROMPT, TARGET),
        writer_kwargs=args.writer,
        trainer_kwargs={"enable_progress_bar": False, "logger": False},
        **args.edit,
    )
    print(
        f"edit {json.dumps(args.edit)} writer {json.dumps(args.writer)}: {time.perf_counter() - started:.1f} s"
    )
    print(
        f"ROUGE-L edited prompt {rouge_l_recall(answer(model, tokenizer, PROMPT, 200), TARGET):.3f}, ", end=""
    )
    print(f"paraphrase {rouge_l_recall(answer(model, tokenizer, PARAPHRASE, 200), TARGET):.3f}")
    print("first answer token's lead over the runner-up (logits), before -> after:")
    unrelated_panel(model, tokenizer, before)


if __name__ == "__main__":
    main()
