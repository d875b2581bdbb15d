"""Which contiguous block of teacher layers to drop for a depth-pruned student.

For every block of ``--drop`` consecutive layers, builds the pruned model (kdflow.prepare.prune_layers)
and measures its held-out perplexity on the workflow's own held-out shard. Prints a table, then one JSON
object as the last line: {"teacher_ppl", "drop", "results": [{"drop_start", "keep_layers", "ppl"}...],
"best": {...}}. Needs `snakemake --cores all` to have prepared the teacher and the held-out shard.

    python bench/prune_scan.py --drop 15 --docs 24
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kdflow.models import load_model, load_tokenizer
from kdflow.perplexity import perplexity
from kdflow.prepare import prune_layers
from kdflow.shards import read_texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="resources/models/smollm2-135m-instruct/kdflow_model.json")
    ap.add_argument("--heldout", default="results/shards/heldout.parquet")
    ap.add_argument("--drop", type=int, default=15, help="layers to drop (one contiguous block)")
    ap.add_argument("--docs", type=int, default=24, help="held-out documents to score")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    teacher, tok = load_model(args.teacher), load_tokenizer(args.teacher)
    texts = read_texts(args.heldout, args.docs)
    n = teacher.config.num_hidden_layers
    base = perplexity(teacher, tok, texts, max_length=args.max_length)["ppl"]
    print(f"teacher ({n} layers): ppl {base:.2f} on {len(texts)} held-out documents")
    results = []
    for start in range(0, n - args.drop + 1):
        keep = [i for i in range(n) if not start <= i < start + args.drop]
        t0 = time.perf_counter()
        ppl = perplexity(prune_layers(teacher, keep), tok, texts, max_length=args.max_length)["ppl"]
        results.append({"drop_start": start, "drop_end": start + args.drop - 1, "keep_layers": keep, "ppl": ppl})
        print(
            f"drop layers {start:2d}-{start + args.drop - 1:2d}: ppl {ppl:14.2f}  ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    best = min(results, key=lambda r: r["ppl"])
    print(
        json.dumps(
            {
                "teacher_ppl": base,
                "drop": args.drop,
                "docs": len(texts),
                "max_length": args.max_length,
                "results": results,
                "best": best,
            }
        )
    )


if __name__ == "__main__":
    main()
